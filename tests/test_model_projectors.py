"""Projectors: parameter names that published LLaVA-Med / STLLaVA-Med weights need, and the cluster maths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig

from medvlm.errors import MedvlmError
from medvlm.model.config import MedVLMConfig
from medvlm.model.projectors import ClusterProjector, build_projector


def _config(projector: str, image_seq_length: int = 16, **kw) -> MedVLMConfig:
    vc = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    tc = LlamaConfig(
        vocab_size=64,
        hidden_size=40,
        intermediate_size=80,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return MedVLMConfig(
        vision_config=vc.to_dict(),
        text_config=tc.to_dict(),
        projector_type=projector,
        image_token_id=5,
        image_seq_length=image_seq_length,
        **kw,
    )


def reference_cluster(p: ClusterProjector, x: torch.Tensor) -> torch.Tensor:
    """STLLaVA-Med's prototype extractor written with 4-D broadcasts (the slow, obvious form)."""
    n = p.num_centers
    value = p.v(x).transpose(1, 2)  # [B, D, L]
    feature = p.f(x)  # [B, L, D]
    centers = F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)  # [B, N, D]
    c_feat = F.adaptive_avg_pool1d(feature.transpose(1, 2), n).transpose(1, 2)  # [B, N, D]
    value_n = (value / value.norm(dim=-1, keepdim=True)).transpose(1, 2)  # [B, L, D], normalised over L
    for _ in range(p.iters):
        centers = p.c(centers)
        cn = centers / centers.norm(dim=-1, keepdim=True)
        logits = (cn[:, :, None, :] * value_n[:, None, :, :]).sum(-1)  # [B, N, L]
        s = logits.softmax(dim=1)
        centers = (s[..., None] * feature[:, None, :, :]).sum(2)  # [B, N, D]
    cos = F.cosine_similarity(centers[:, :, None, :], x[:, None, :, :], dim=-1)  # [B, N, L]
    sim = torch.sigmoid(p.sim_beta + p.sim_alpha * cos)
    onehot = F.one_hot(sim.argmax(dim=1), n).permute(0, 2, 1).to(sim.dtype)  # [B, N, L]
    sim = sim * onehot
    agg = ((sim[..., None] * feature[:, None, :, :]).sum(2) + c_feat) / (onehot.sum(-1, keepdim=True) + 1)
    out = x + (sim[..., None] * agg[:, :, None, :]).sum(1)  # [B, L, D]
    return p.mlp(out)


@pytest.mark.parametrize("tokens,centers", [(16, 4), (10, 32), (49, 49)])
def test_cluster_matmul_equals_reference_broadcast(tokens: int, centers: int) -> None:
    torch.manual_seed(0)
    p = ClusterProjector(in_dim=12, out_dim=20, num_centers=centers, iters=2).double()
    with torch.no_grad():  # non-default alpha/beta so both enter the check
        p.sim_alpha.fill_(1.7)
        p.sim_beta.fill_(-0.3)
    x = torch.randn(3, tokens, 12, dtype=torch.float64)
    got = p(x)
    assert got.shape == (3, tokens, 20)
    torch.testing.assert_close(got, reference_cluster(p, x), atol=1e-10, rtol=0)


def test_cluster_parameter_names_init_and_unused_ln() -> None:
    torch.manual_seed(0)
    from medvlm.model.modeling import MedVLMForConditionalGeneration

    model = MedVLMForConditionalGeneration(_config("cluster", cluster_num_centers=8, cluster_iters=2))
    p = model.projector
    assert isinstance(p, ClusterProjector)
    assert [n for n, _ in p.named_parameters()] == [
        "sim_alpha",
        "sim_beta",
        "c.weight",
        "c.bias",
        "v.weight",
        "v.bias",
        "f.weight",
        "f.bias",
        "ln_1.weight",
        "ln_1.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    ]
    assert p.sim_alpha.item() == 1.0 and p.sim_beta.item() == 0.0
    assert (p.num_centers, p.iters) == (8, 2)
    assert type(p.mlp[1]).__name__ == "QuickGELUActivation"
    x = torch.randn(2, 16, 24)
    out = p(x)
    assert out.shape == (2, 16, 40)  # token count kept, vision hidden -> text hidden
    out.sum().backward()
    assert p.ln_1.weight.grad is None and p.ln_1.bias.grad is None
    for name in ("sim_alpha", "sim_beta", "c.weight", "v.weight", "f.weight", "mlp.0.weight", "mlp.2.weight"):
        assert p.get_parameter(name).grad is not None, name


def test_linear_and_mlp_state_dict_keys_match_llava_med() -> None:
    lin = build_projector(_config("linear"))
    assert isinstance(lin, torch.nn.Linear) and list(lin.state_dict()) == ["weight", "bias"]
    assert tuple(lin.weight.shape) == (40, 24)
    mlp = build_projector(_config("mlp2x_gelu"))
    assert list(mlp.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert tuple(mlp[0].weight.shape) == (40, 24) and tuple(mlp[2].weight.shape) == (40, 40)
    assert mlp(torch.randn(2, 5, 24)).shape == (2, 5, 40)


def test_unknown_projector_lists_choices() -> None:
    with pytest.raises(
        MedvlmError, match=r"unknown projector_type 'resampler'; choose one of linear, mlp2x_gelu, cluster"
    ):
        _config("resampler")


def test_bad_strategy_and_seq_length_are_clear_errors() -> None:
    from medvlm.model.modeling import MedVLMForConditionalGeneration

    with pytest.raises(MedvlmError, match="vision_feature_select_strategy"):
        _config("linear", vision_feature_select_strategy="default")
    with pytest.raises(MedvlmError, match=r"image_seq_length 17 does not match .* 16 features"):
        MedVLMForConditionalGeneration(_config("linear", image_seq_length=17))
