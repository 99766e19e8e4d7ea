"""ENACT statistics for logging, read from the modules' ``last_stats`` (device tensors, no sync)."""
import torch


def enact_stats(model):
    """Mean clusters per image and clusters / pixels over the ENACT layers of the last forward.

    Returns {} when the model has no ENACT layer (plain detector).
    """
    clusters, ratios = [], []
    for module in model.modules():
        stats = getattr(module, "last_stats", None)
        if not stats:
            continue
        c = stats["clusters_per_image"].float()
        clusters.append(c.mean())
        ratios.append((c / stats["pixels_per_image"].float().clamp(min=1)).mean())
    if not clusters:
        return {}
    return {"enact_clusters_per_img": torch.stack(clusters).mean(),
            "enact_cluster_ratio": torch.stack(ratios).mean()}
