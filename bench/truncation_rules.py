"""What `data.truncation_rule = "fit"` changes against "official", measured on the real files.

Every pair of ../shared/data's AlpacaEval preference file and the HH harmless test split is
tokenised once, uncut (the official convention, the real Mistral tokenizer, the Mistral-Instruct
override and the zephyr templates), then cut by both rules at the recipes' lengths. Prints, per
setting, the share of pairs whose tokens differ between the rules and what each rule cuts.
Not a speed benchmark (run_all.py does not run it).

    python bench/truncation_rules.py            # about a minute on one core
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MISTRAL_SIMPO, MISTRAL_SPM, SHARED, machine  # noqa: E402
from simpo.config import DataConfig  # noqa: E402
from simpo.data import load_pairs, truncate_pair  # noqa: E402
from simpo.readers import Skip  # noqa: E402
from simpo.templates import ZEPHYR  # noqa: E402
from simpo.tokenizer import Tokenizer  # noqa: E402

FILES = ("alpaca_eval_prefs.jsonl", "hh_rlhf_harmless_test.jsonl.gz")
TEMPLATES = {"mistral-simpo": MISTRAL_SIMPO.read_text(), "zephyr": ZEPHYR}
LENGTHS = ((2048, 1800), (1024, 512))


def cut(pair, max_length: int, max_prompt_length: int, rule: str):
    """(prompt, chosen, rejected, prompt cut, a response cut), or None when "fit" skips it."""
    responses = [pair.chosen_ids, pair.rejected_ids]
    keep_first = int(pair.prompt_ids[:1] == [1])  # Mistral's BOS
    try:
        prompt, (c, r), p_cut, r_cut = truncate_pair(
            pair.prompt_ids, responses, max_length, max_prompt_length, "keep_end", keep_first, rule
        )
    except Skip:
        return None
    return prompt, c, r, p_cut, any(r_cut)


def main() -> None:
    if not MISTRAL_SPM.is_file():
        print(f"truncation_rules: SKIPPED: {SHARED} is absent")
        return
    tok = Tokenizer.from_dir(MISTRAL_SPM)
    print(f"# truncation rules ({machine()})\n")
    print("| file | template | max_length / prompt | pairs | differ | official cuts "
          "prompt / responses | fit cuts prompt / responses / skips |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in FILES:
        for template, source in TEMPLATES.items():
            cfg = DataConfig(
                chat_template=source, max_length=10**7, max_prompt_length=10**7, num_workers=2
            )
            pairs, _ = load_pairs(SHARED / name, tok, cfg, progress=False)
            for max_length, max_prompt_length in LENGTHS:
                differ, official, fit = 0, [0, 0], [0, 0, 0]
                for p in pairs:
                    a = cut(p, max_length, max_prompt_length, "official")
                    b = cut(p, max_length, max_prompt_length, "fit")
                    differ += b is None or a[:3] != b[:3]
                    official[0] += a[3]
                    official[1] += a[4]
                    if b is None:
                        fit[2] += 1
                    else:
                        fit[0] += b[3]
                        fit[1] += b[4]
                n = len(pairs)
                print(
                    f"| {name} | {template} | {max_length} / {max_prompt_length} | {n} | "
                    f"{differ} ({differ / n:.2%}) | {official[0]} / {official[1]} | "
                    f"{fit[0]} / {fit[1]} / {fit[2]} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
