"""The one exception type for bad dataset input."""


class DatasetError(Exception):
    """Bad input data: the message is ONE line that names the file and the problem.

    A DataLoader worker re-raises an exception in the main process as
    ``DatasetError("Caught DatasetError in DataLoader worker process 0.\\nOriginal ...")``; the
    constructor keeps only the original one-line message in that case, so the user still
    sees a single clear line.
    """

    _MARK = "DatasetError: "

    def __init__(self, message=""):
        message = str(message)
        if "\n" in message:
            lines = [ln for ln in message.splitlines() if ln.strip()]
            picked = [ln.split(self._MARK, 1)[1] for ln in lines if self._MARK in ln]
            message = picked[-1] if picked else lines[-1] if lines else ""
        super().__init__(message.strip())
