"""LoRA layers that compute with their merged weight (ddpo.lora.compute_merged), against peft's
own side-branch forward on the same weights: outputs, gradients, the base model, the sampled
chain."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from ddpo.lora import compute_merged
from ddpo.policy import Policy
from ddpo.presets import EVERY_LAYER

PROMPTS = ["a red circle on a plain background", "a blue square on a striped background"]


def pair(tiny_pipe, **kwargs):
    """The same policy twice, peft's forward and the merged one, with LoRA on every linear layer
    and convolution and a non-zero B (at the start B = 0 and both are the base model)."""
    make = lambda merged: Policy(  # noqa: E731
        copy.deepcopy(tiny_pipe), lora_targets=EVERY_LAYER, lora_merged=merged, **kwargs
    )
    peft, merged = make(False), make(True)
    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=generator) * 0.05
        for k, v in peft.lora_state_dict().items()
    }
    peft.load_lora_state_dict(state)
    merged.load_lora_state_dict(state)
    return peft, merged


def branch_calls(policy: Policy) -> list[int]:
    """A counter of calls into the LoRA side branches (the A modules) of `policy`."""
    calls = [0]
    for module in policy.unet.modules():
        if isinstance(module, LoraLayer):
            for a in module.lora_A.values():
                a.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_merged_forward_is_peft_forward_with_the_same_gradients(tiny_pipe):
    peft, merged = pair(tiny_pipe, num_steps=4, guidance_scale=5.0)
    kinds = {type(m.get_base_layer()) for m in merged.unet.modules() if isinstance(m, LoraLayer)}
    assert kinds == {torch.nn.Linear, torch.nn.Conv2d}  # both code paths are covered
    peft_calls, merged_calls = branch_calls(peft), branch_calls(merged)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, *peft.latent_shape(), generator=generator)
    x_next = torch.randn(2, *peft.latent_shape(), generator=generator)
    embeds = peft.encode_prompts(PROMPTS)
    t = peft.scheduler.timesteps[1]
    grads = []
    for policy in (peft, merged):
        log_prob = policy.log_prob(embeds, x, t, x_next)
        log_prob.sum().backward()
        grads.append({n: p.grad for n, p in policy.unet.named_parameters() if p.requires_grad})
        grads[-1]["log_prob"] = log_prob.detach()
    assert peft_calls[0] > 0 and merged_calls[0] == 0  # the merged policy has no side branch
    torch.testing.assert_close(grads[1]["log_prob"], grads[0]["log_prob"], rtol=1e-5, atol=1e-4)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    flat = [torch.cat([g[name].flatten() for name in grads[0]]) for g in grads]
    assert (flat[1] - flat[0]).norm() < 1e-4 * flat[0].norm()
    scale = flat[0].abs().max().item()  # every element too, on the scale of the whole gradient
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=0, atol=1e-5 * scale, msg=name)


def test_merged_policy_keeps_the_base_model_and_samples_the_same_chain(tiny_pipe):
    peft, merged = pair(tiny_pipe, num_steps=6, guidance_scale=5.0)
    x = torch.randn(2, *peft.latent_shape(), generator=torch.Generator().manual_seed(2))
    embeds = peft.encode_prompts(PROMPTS)
    t = peft.scheduler.timesteps[2]
    with torch.no_grad():
        adapted = merged.guided_noise(x, t, embeds)
        with peft.base_model(), merged.base_model():
            base = (peft.guided_noise(x, t, embeds), merged.guided_noise(x, t, embeds))
    assert torch.equal(base[0], base[1])  # the adapter switch gives peft's base model exactly
    assert (adapted - base[1]).abs().max() > 1e-3  # and the adapters are on outside it
    # The peft policy samples the same chain, up to float rounding (on-policy ratios of 1 under
    # the merged forward: test_policy.py's test_recomputed_log_prob_equals_sampled).
    traj = merged.sample(PROMPTS * 2, [5, 6, 7, 8])
    reference = peft.sample(PROMPTS * 2, [5, 6, 7, 8])
    torch.testing.assert_close(traj.log_probs, reference.log_probs, rtol=0, atol=1e-4)


def test_merged_lora_refuses_a_half_precision_base(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe).to(dtype=torch.float16)
    refusal = r"train.lora_merged: .*adapters' dtype \(torch.float32\), not torch.float16.*"
    with pytest.raises(ValueError, match=refusal + "--train.no-lora-merged"):
        Policy(pipe, lora_merged=True)


@pytest.mark.parametrize(
    "options, refusal",
    [
        ({"lora_dropout": 0.1}, "cannot apply LoRA dropout"),
        ({"use_dora": True}, "supports plain LoRA, not"),
        ({"target_modules": ["fc", "embed"]}, "Linear and Conv2d layers, not .*Embedding"),
    ],
)
def test_compute_merged_refuses_what_it_cannot_merge_and_changes_nothing(options, refusal):
    model = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 4), "embed": torch.nn.Embedding(5, 4)})
    config = LoraConfig(
        r=2, lora_alpha=2, init_lora_weights=False, **{"target_modules": ["fc"]} | options
    )
    model = inject_adapter_in_model(config, model)
    with pytest.raises(TypeError, match=refusal):
        compute_merged(model)
    # No layer was switched to the merged forward: peft's own is still every layer's.
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, LoraLayer))
