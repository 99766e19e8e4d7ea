"""Shared pytest set-up: import paths for the detector folders, the `cuda` marker, shapes data."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for folder in ("DETR-ENACT", "Conditional-DETR-ENACT", "Anchor-DETR-ENACT"):
    sys.path.insert(0, str(ROOT / folder))
sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory):
    """A tiny shapes dataset in COCO layout: 8 train / 4 val images of 64-128 px."""
    out = tmp_path_factory.mktemp("shapes_coco")
    _load_tool("make_shapes_coco").generate(
        out, num_train=8, num_val=4, min_size=64, max_size=128, seed=0)
    return out


@pytest.fixture()
def skip_spy(monkeypatch):
    """The skip_count_read that each _cluster call of ENACT's layers is given, in call order."""
    from enact_cuda.module import _ENACTRegions
    asked, real = [], _ENACTRegions._cluster

    def spy(layer, *args, skip_count_read=False, **kwargs):
        asked.append(skip_count_read)
        return real(layer, *args, skip_count_read=skip_count_read, **kwargs)

    monkeypatch.setattr(_ENACTRegions, "_cluster", spy)
    return asked
