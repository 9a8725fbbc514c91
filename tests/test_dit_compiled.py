"""The torch.compile'd elementwise kernels (a GPU speed option) compute what the eager, reference-exact ones do."""
import torch

from dit_oracle import TINY
from sdv2_lab.backbones.checkpoints import load_backbone
from sdv2_lab.backbones.wan_dit import WanDiTConfig


def test_compiled_kernels_match_eager():
    m = load_backbone(WanDiTConfig(name="tiny", **TINY), "dummy", dtype=torch.float32)
    caches = [m.new_cache(1, 32, 48, 6, 3, 0.2) for _ in range(2)]
    ctx = torch.randn(1, 512, 4096)
    for c in caches:
        m.set_prompt(c, ctx)
    inputs = [(torch.randn(1, 2, 16, 4, 6), torch.full((1, 2), 700), [0]),
              (torch.randn(1, 1, 16, 4, 6), torch.full((1, 1), 500), [12])]
    with torch.no_grad():
        eager = [m(x, t, caches[0], s) for x, t, s in inputs]
        m.use_compiled_kernels(True)
        fused = [m(x, t, caches[1], s) for x, t, s in inputs]
        m.use_compiled_kernels(False)
    for a, b in zip(eager, fused):
        assert ((a - b).norm() / a.norm()).item() < 1e-5
