"""The networks' layout is part of the artifact format: a bank's weights.npz stores one array per
parameter and buffer by name, so a change of layers, names or shapes makes every saved bank
unloadable. This test pins the layout of each network family at small sizes against
tests/unit/data/layouts.json; change it only together with artifacts.FORMAT_VERSION.

    python tests/unit/test_layout.py --write     # re-record after a deliberate, versioned change
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch import nn

from protofuse.artifacts import FORMAT_VERSION
from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes
from protofuse.model.generative import GenerativeConfig, GenerativePrototypes

RECORD = Path(__file__).parent / "data" / "layouts.json"

CONFIGS = {
    "discriminative conv 12x12": lambda: DiscriminativePrototypes(
        DiscriminativeConfig(144, 5, 3, feat_dim=8, encoder="conv", image_shape=(12, 12))
    ),
    "discriminative mlp": lambda: DiscriminativePrototypes(
        DiscriminativeConfig(10, 5, 3, feat_dim=8, encoder="mlp")
    ),
    "generative mlp bernoulli": lambda: GenerativePrototypes(GenerativeConfig(10, 5, hidden=16)),
    "generative mlp gaussian": lambda: GenerativePrototypes(
        GenerativeConfig(10, 5, hidden=16, likelihood="gaussian")
    ),
    "generative conv 12x12": lambda: GenerativePrototypes(
        GenerativeConfig(144, 5, hidden=16, image_shape=(12, 12), conv=True)
    ),
    # Layer normalization: the same arrays less the running statistics (nothing else may move).
    "discriminative conv 12x12 layer norm": lambda: DiscriminativePrototypes(
        DiscriminativeConfig(
            144, 5, 3, feat_dim=8, encoder="conv", image_shape=(12, 12), norm="layer"
        )
    ),
    "discriminative mlp layer norm": lambda: DiscriminativePrototypes(
        DiscriminativeConfig(10, 5, 3, feat_dim=8, encoder="mlp", norm="layer")
    ),
    "generative conv 12x12 layer norm": lambda: GenerativePrototypes(
        GenerativeConfig(144, 5, hidden=16, image_shape=(12, 12), conv=True, norm="layer")
    ),
}


def layout(model: nn.Module) -> dict:
    """Every stored array's name and shape, and the kinds of layer in order (activations
    included)."""
    return {
        "arrays": {k: list(v.shape) for k, v in model.state_dict().items()},
        "layers": [type(m).__name__ for m in model.modules()],
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_network_layout_matches_the_recorded_format(name):
    recorded = json.loads(RECORD.read_text())
    assert recorded["format_version"] == FORMAT_VERSION, (
        "the layouts were recorded for another artifact format version"
    )
    assert layout(CONFIGS[name]()) == recorded["layouts"][name]


@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if n.endswith(" layer norm")])
def test_layer_norm_keeps_every_array_but_the_running_statistics(name):
    batch = layout(CONFIGS[name.removesuffix(" layer norm")]())["arrays"]
    layer = layout(CONFIGS[name]())["arrays"]
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert {k: v for k, v in batch.items() if not k.endswith(statistics)} == layer


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    RECORD.write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "layouts": {n: layout(make()) for n, make in sorted(CONFIGS.items())},
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RECORD}")
