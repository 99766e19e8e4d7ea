"""--enact_attn_dropout: the dropout of ENACT's clustered attention weights in all three
detectors (default --dropout; the official ENACT code has none), plain attention untouched."""
import pytest
import torch

from _cli import TINY, load_main, without

FOLDERS = ["DETR-ENACT", "Conditional-DETR-ENACT", "Anchor-DETR-ENACT"]


def encoder_attention_dropouts(folder, *flags):
    """Build the detector from its main.py parser and the TINY flags -> the attention dropout
    of each encoder self-attention (ENACT's, or the plain one with --no_enact)."""
    main = load_main(folder)
    base = without(TINY, "--num_queries") if folder == "Anchor-DETR-ENACT" else TINY
    args = main.get_parser().parse_args([*base, "--num_classes", "5", "--dropout", "0.1", *flags])
    torch.manual_seed(0)
    model = main.DETECTOR.build(args)[0]
    t = model.transformer
    layers = t.encoder_layers if folder == "Anchor-DETR-ENACT" else t.encoder.layers
    return [layer.self_attn.dropout for layer in layers]


@pytest.mark.parametrize("folder", FOLDERS)
def test_enact_attention_dropout_defaults_to_dropout_and_can_be_set(folder):
    assert encoder_attention_dropouts(folder) == [0.1]
    assert encoder_attention_dropouts(folder, "--enact_attn_dropout", "0") == [0.0]
    assert encoder_attention_dropouts(folder, "--enact_attn_dropout", "0.3") == [0.3]
    # the plain detector keeps --dropout for its attention
    assert encoder_attention_dropouts(folder, "--no_enact", "--enact_attn_dropout", "0") == [0.1]


def test_zero_enact_attention_dropout_makes_the_training_attention_deterministic():
    """The value reaches the forward pass: in training, with --enact_attn_dropout 0 two forwards
    of the ENACT attention agree, with the default 0.1 they do not."""
    main = load_main("Conditional-DETR-ENACT")
    torch.manual_seed(0)
    src, pos = torch.randn(2, 48, 32), torch.randn(2, 48, 32)
    for flags, same in (((), False), (("--enact_attn_dropout", "0"), True)):
        args = main.get_parser().parse_args([*TINY, "--num_classes", "5", "--dropout", "0.1",
                                            *flags])
        attn = main.DETECTOR.build(args)[0].transformer.encoder.layers[0].self_attn.train()
        first, second = attn(src, pos, None, (6, 8)), attn(src, pos, None, (6, 8))
        assert torch.equal(first, second) is same


def _enact_modules(folder, *flags):
    main = load_main(folder)
    base = without(TINY, "--num_queries") if folder == "Anchor-DETR-ENACT" else TINY
    args = main.get_parser().parse_args([*base, "--num_classes", "5", *flags])
    model = main.DETECTOR.build(args)[0]
    from enact_cuda.module import _ENACTRegions
    return [m for m in model.modules() if isinstance(m, _ENACTRegions)]


@pytest.mark.parametrize("folder", FOLDERS)
def test_enact_wait_for_counts_flag_reaches_every_enact_layer(folder):
    """By default every ENACT layer guesses its training cluster rows, under bf16 autocast too;
    with --enact_wait_for_counts, or under --amp fp16 (whose GradScaler cannot redo a step
    whose guess fell short), every one reads its count back (the forward-level behaviour is a
    CUDA test: tests/test_enact_cuda.py)."""
    guessing = _enact_modules(folder)
    assert guessing and not any(m.wait_for_counts for m in guessing)
    assert not any(m.wait_for_counts for m in _enact_modules(folder, "--amp", "bf16"))
    for flags in (["--enact_wait_for_counts"], ["--amp", "fp16"]):
        waiting = _enact_modules(folder, *flags)
        assert len(waiting) == len(guessing) and all(m.wait_for_counts for m in waiting), flags
