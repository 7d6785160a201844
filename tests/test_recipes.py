"""The recipes in configs/ hold the numbers of the official SimPO files they cite, the shipped
template overrides are the official ones byte for byte, HF's warmup schedule, eval presets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from simpo.config import EVAL_PRESETS, load_config
from simpo.schedule import lr_at
from simpo.templates import GEMMA, render

ROOT = Path(__file__).resolve().parents[1]

# princeton-nlp/SimPO training_configs/<file>.yaml, transcribed: beta, gamma_beta_ratio,
# learning_rate, max_length, max_prompt_length, eval_steps (all: 1 epoch, warmup_ratio 0.1,
# cosine, 2 per device x 16 accumulation x 4 GPUs = 128 pairs, do_eval on the test split)
OFFICIAL = {
    "mistral-7b-base-simpo": ("mistral-7b-base-simpo.yaml", 2.0, 0.8, 3e-7, 1024, 512, 400),
    "mistral-7b-instruct-simpo": (
        "mistral-7b-instruct-simpo.yaml",
        2.5,
        0.1,
        5e-7,
        2048,
        1800,
        400,
    ),
    "llama3-8b-base-simpo": ("llama-3-8b-base-simpo.yaml", 2.0, 0.5, 6e-7, 2048, 1800, 400),
    "llama3-8b-instruct-simpo-v0.1": (
        "llama-3-8b-instruct-simpo.yaml",
        2.5,
        0.55,
        1e-6,
        2048,
        1800,
        400,
    ),
    "llama3-8b-instruct-simpo": (
        "llama-3-8b-instruct-simpo-v2.yaml",
        10.0,
        0.3,
        1e-6,
        2048,
        1800,
        400,
    ),
    "gemma2-9b-it-simpo": ("gemma-2-9b-it-simpo.yaml", 10.0, 0.5, 8e-7, 2048, 1800, 400),
    # the DPO rows of the README's table: β 0.01; lr 3e-7 for Llama-3-Instruct v0.2, 5e-7 Gemma
    "llama3-8b-instruct-dpo": ("README.md", 0.01, None, 3e-7, 2048, 1800, 400),
    "gemma2-9b-it-dpo": ("README.md", 0.01, None, 5e-7, 2048, 1800, 400),
    "llama3-8b-base-sft": ("llama-3-8b-base-sft.yaml", None, None, 2e-5, 2048, 1800, 200),
}
# scripts/run_simpo.py MISTRAL_CHAT_TEMPLATE, as its Python literal reads
MISTRAL_CHAT_TEMPLATE = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'].strip() + '\n\n' %}{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"  # noqa: E501
# training_configs/gemma-2-9b-it-simpo.yaml chat_template, as YAML reads its double quotes
GEMMA2_SIMPO = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}{% for message in messages %}{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"  # noqa: E501


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_holds_the_official_numbers(name):
    source, beta, ratio, lr, max_length, max_prompt_length, eval_every = OFFICIAL[name]
    text = (ROOT / "configs" / f"{name}.toml").read_text()
    assert source in text  # the recipe names the file it reproduces
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert beta is None or cfg.loss.beta == beta
    assert ratio is None or cfg.loss.gamma_beta_ratio == ratio
    assert (cfg.train.lr, cfg.data.max_length, cfg.data.max_prompt_length) == (
        lr,
        max_length,
        max_prompt_length,
    )
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.warmup_ratio) == (128, 1, 0.1)
    assert (cfg.train.warmup_style, cfg.train.min_lr_ratio) == ("hf", 0.0)
    assert cfg.train.eval_every == eval_every and cfg.data.eval and not cfg.data.eval_fraction
    if cfg.loss.name != "sft":
        assert (cfg.data.mask, cfg.data.truncation_rule, cfg.data.truncation) == (
            "official",
            "official",
            "keep_end",
        )
    if cfg.loss.name == "simpo":
        assert cfg.loss.loss_type == "sigmoid" and cfg.loss.label_smoothing == 0
        assert cfg.loss.sft_weight == 0


def test_template_overrides_are_the_official_ones():
    mistral = load_config(ROOT / "configs" / "mistral-7b-instruct-simpo.toml").data
    assert (ROOT / mistral.chat_template).read_text() == MISTRAL_CHAT_TEMPLATE
    for name in ("gemma2-9b-it-simpo", "gemma2-9b-it-dpo"):
        gemma = load_config(ROOT / "configs" / f"{name}.toml").data
        assert (ROOT / gemma.chat_template).read_text() == GEMMA2_SIMPO
    # the named "gemma" template writes the Jinja escapes instead: it renders the same
    messages = [{"role": "system", "content": " S "}, {"role": "user", "content": "Q"}]
    special = {"bos_token": "<bos>", "eos_token": "<eos>"}
    assert render(GEMMA, messages, special) == render(GEMMA2_SIMPO, messages, special)


@pytest.mark.parametrize("total, ratio", [(100, 0.1), (7, 0.1), (476, 0.1), (10, 0.0)])
def test_hf_warmup_equals_transformers_cosine_schedule(total, ratio):
    """warmup_style "hf": the lr of update k is HF's `get_cosine_schedule_with_warmup` at k
    (the Trainer steps the scheduler after the optimizer, so update 0 runs at lr 0)."""
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("transformers.optimization")
    warm = -(-int(ratio * total * 1000) // 1000)  # ceil(ratio * total), as TrainingArguments
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = optimization.get_cosine_schedule_with_warmup(opt, warm, total)
    for step in range(total):
        assert lr_at(step, total, 2.0, ratio, warmup_style="hf") == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15
        )
        opt.step()
        sched.step()
    assert lr_at(0, 100, 2.0, 0.1, warmup_style="hf") == 0.0
    assert lr_at(0, 100, 2.0, 0.1) == pytest.approx(0.2)  # "linear": the first update moves
    with pytest.raises(ValueError, match="warmup_style"):
        lr_at(0, 100, 2.0, 0.1, warmup_style="cosine")


def test_eval_presets_hold_the_official_alpacaeval_settings():
    """princeton-nlp/SimPO eval/alpacaeval2/configs/*.yaml (vLLM sampling)."""
    assert EVAL_PRESETS == {
        "alpacaeval-llama3": {"temperature": 0.9, "top_p": 1.0, "max_new_tokens": 4096},
        "alpacaeval-mistral-base": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 2048},
        "alpacaeval-mistral-instruct": {"temperature": 0.5, "top_p": 1.0, "max_new_tokens": 2048},
    }
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "eval.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    args = ev.parse_args(["--model", "m", "--preset", "alpacaeval-mistral-base"])
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.7, 1.0, 2048)
    args = ev.parse_args(["--model", "m", "--preset", "alpacaeval-llama3", "--temperature", "0"])
    assert (args.temperature, args.max_new_tokens) == (0.0, 4096)  # an explicit flag wins


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_logit_sums_for_the_official_logits_metric(softcap):
    """`response_logprobs(..., logit_sums=)` adds each response's sum over scored tokens of the
    mean (soft-capped) logit: the official trainer's `logits/chosen` on response positions."""
    torch = pytest.importorskip("torch")
    from simpo.logprobs import response_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 1, 2, 4, 5, 7, 8])
    targets = torch.randint(0, 13, (7,), generator=g)
    responses = torch.tensor([0, 0, 0, 1, 1, 3, 3])  # response 2 has no token
    logit_sums = torch.zeros(4, dtype=torch.float64)
    args = (hidden, weight, index, targets, responses, 4, softcap)
    sums, _ = response_logprobs(*args, chunk_size=3, logit_sums=logit_sums)
    z = hidden.detach()[index] @ weight.t()  # (N, V), the naive way
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    want = torch.zeros(4, dtype=torch.float64).index_add_(0, responses, z.mean(dim=1))
    torch.testing.assert_close(logit_sums, want, rtol=1e-12, atol=1e-12)
    plain, _ = response_logprobs(*args, chunk_size=3)
    torch.testing.assert_close(sums, plain, rtol=0, atol=0)  # the log-probs are untouched
    with pytest.raises(ValueError, match="logit_sums must have shape"):
        response_logprobs(*args, logit_sums=torch.zeros(3, dtype=torch.float64))
