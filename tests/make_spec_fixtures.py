"""Recomputes the TRL reference numbers of ``tests/spec_fixtures.py`` from the installed TRL.

    python tests/make_spec_fixtures.py           # print TRL's numbers and rewrite the ones that differ
    python tests/make_spec_fixtures.py --check   # compare only; exit 1 naming every row that differs

Every row of ``LOSS_TABLE`` is run through TRL's own ``GRPOTrainer._compute_loss`` (or
``GMPOTrainer._compute_loss`` for ``algorithm="gmpo"``) on the fixture tensors, the way
docs/semantics.md section 14 describes: the model forward is stubbed (it returns the fixture's
log-probs, a float32 leaf that requires grad), one process, train mode, no entropy bonus, no MoE
loss. The trainer object is not constructed (that needs a model and a tokenizer): the loss method
runs on a stand-in holding the attributes ``GRPOTrainer.__init__`` copies from a real
``GRPOConfig`` / ``GMPOConfig``, so TRL's config defaults (``epsilon``, ``epsilon_high``, the
SAPO / VESPO constants, ...) are TRL's. The recorded numbers are the loss, the sum of
``d loss / d logp`` over all 16 entries, and the metrics a row lists, at the precision they are
stored with; ``--check`` accepts a difference of up to half a unit in the last stored digit.

Rows that TRL 1.16 cannot compute are skipped with the reason printed:

* ``importance_sampling_level="sequence_token"`` (GSPO-token) lived in ``trl.experimental.gspo_token``,
  whose last release is TRL 1.13; these rows come from that module and stay as committed.

GFPO (TRL 1.7.1's ``trl.experimental.gfpo``, removed in 1.8) has no row here: its fixture is in
tests/test_advantages.py and needs that TRL release.
"""
from __future__ import annotations

import argparse
import ast
import math
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "spec_fixtures.py"
sys.path.insert(0, str(HERE))

import spec_fixtures as fx  # noqa: E402

# policy_loss keywords -> TRL config fields (the rest of the fields keep TRL's defaults)
CONFIG_FIELDS = ("loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta", "beta",
                 "max_completion_length")


def skip_reason(kwargs: dict) -> str | None:
    """Why TRL 1.16 cannot recompute a row, or None."""
    if kwargs.get("importance_sampling_level") == "sequence_token":
        return ("GSPO-token lived in trl.experimental.gspo_token, absent since TRL 1.14 (last in 1.13); "
                "the committed numbers come from that release")
    return None


def trl_config(kwargs: dict, output_dir: str):
    """The GRPOConfig (GMPOConfig for algorithm='gmpo') of one row, validated by TRL itself."""
    from trl import GRPOConfig
    from trl.experimental.gmpo import GMPOConfig

    gmpo = kwargs.get("algorithm", "grpo") == "gmpo"
    fields = {name: kwargs[name] for name in CONFIG_FIELDS if name in kwargs}
    fields.setdefault("max_completion_length", fx.COMMON["max_completion_length"])
    rho = kwargs.get("importance_sampling_ratio")
    if rho is not None:  # TRL applies the ratio only when it came from vLLM with the correction on
        fields.update(use_vllm=True, vllm_importance_sampling_correction=True,
                      vllm_importance_sampling_mode="token_truncate" if rho.dim() == 2 else "sequence_truncate")
    ga = kwargs.get("grad_accum_steps", 1)
    # TRL 1.13+ defaults use_bias_correction_kl to True; the fixture's default (ours) is False.
    fields["use_bias_correction_kl"] = bool(kwargs.get("use_bias_correction_kl", False))
    cls = GMPOConfig if gmpo else GRPOConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(output_dir=output_dir, report_to="none", use_cpu=True, bf16=False, fp16=False,
                   per_device_train_batch_size=fx.LOGP.shape[0], num_generations=fx.LOGP.shape[0],
                   gradient_accumulation_steps=ga, steps_per_generation=ga, **fields)


def stand_in(args, logp: torch.Tensor, entropy: torch.Tensor):
    """An object with what ``_compute_loss`` reads off a trainer, set as ``GRPOTrainer.__init__`` sets it from
    ``args``; the forward returns ``(logp, entropy, None)``; one process (reduce / gather are the identity)."""
    from trl import GRPOTrainer

    def forward(model, input_ids, attention_mask, logits_to_keep, **_):
        return logp, entropy, None

    def reduce(x, reduction="sum"):
        return x

    return SimpleNamespace(
        args=args, loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold, top_entropy_quantile=args.top_entropy_quantile,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        beta=args.beta, use_vllm=args.use_vllm,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        max_completion_length=args.max_completion_length, entropy_coef=args.entropy_coef,
        use_adaptive_entropy=args.use_adaptive_entropy,
        _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=args.gradient_accumulation_steps,
        accelerator=SimpleNamespace(num_processes=1, reduce=reduce, gather=lambda x: x, gather_for_metrics=lambda x: x),
        _get_per_token_logps_and_entropies=forward, get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )


def trl_row(kwargs: dict, output_dir: str) -> tuple[float, float, dict[str, float]]:
    """(loss, sum of dloss/dlogp, every metric TRL logged) of one LOSS_TABLE row, from TRL's own loss."""
    from trl import GRPOTrainer
    from trl.experimental.gmpo import GMPOTrainer

    args = trl_config(kwargs, output_dir)
    B, T = fx.LOGP.shape
    lp = fx.LOGP.clone().requires_grad_()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": fx.MASK.clone(),
        "advantages": fx.ADVANTAGES.clone(), "old_per_token_logps": fx.OLD_LOGP.clone(),
        "num_items_in_batch": torch.tensor(float(fx.COMMON["num_items_in_batch"])),
    }
    if "ref_logp" in kwargs:
        inputs["ref_per_token_logps"] = kwargs["ref_logp"].clone()
    rho = kwargs.get("importance_sampling_ratio")
    if rho is not None:  # TRL holds a sequence-level ratio as (B, 1)
        inputs["importance_sampling_ratio"] = rho.clone() if rho.dim() == 2 else rho.reshape(-1, 1).clone()
    trainer = stand_in(args, lp, torch.ones(B, T))
    method = GMPOTrainer._compute_loss if kwargs.get("algorithm") == "gmpo" else GRPOTrainer._compute_loss
    loss = method(trainer, None, inputs)
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.item(), lp.grad.sum().item(), metrics


# ----------------------------------------------------------------------------- reading and writing the table
def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def table_numbers(source: str):
    """For every LOSS_TABLE row: (id, [(name, stored text, (start, end) offsets in source)]) with names
    "loss", "gradsum" and the metric names."""
    tree = ast.parse(source)
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def span(node):
        return starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset

    table = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "LOSS_TABLE" for t in n.targets))
    rows = []
    for row in table.elts:
        row_id, _, loss, gradsum, metrics = row.elts
        entries = [("loss", loss), ("gradsum", gradsum)]
        entries += [(ast.literal_eval(k), v) for k, v in zip(metrics.keys, metrics.values)]
        rows.append((ast.literal_eval(row_id),
                     [(name, ast.get_source_segment(source, node), span(node)) for name, node in entries]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed values; write nothing")
    opts = parser.parse_args(argv)

    import trl

    print(f"TRL {trl.__version__}, torch {torch.__version__}, float32, one process, stubbed forward")
    source = FIXTURES.read_text()
    kwargs_of = {row[0]: row[1] for row in fx.LOSS_TABLE}
    differing, edits = [], []
    with tempfile.TemporaryDirectory() as output_dir:
        for row_id, stored in table_numbers(source):
            reason = skip_reason(kwargs_of[row_id])
            if reason:
                print(f"SKIP {row_id}: {reason}")
                continue
            loss, gradsum, metrics = trl_row(kwargs_of[row_id], output_dir)
            computed = {"loss": loss, "gradsum": gradsum, **metrics}
            bad = []
            for name, text, where in stored:
                value = computed.get(name, math.nan)
                d = _decimals(text)
                if not abs(value - ast.literal_eval(text)) <= 0.5 * 10.0 ** -d + 1e-9:
                    bad.append(f"{name} {text} -> {value:.{max(d, 6)}f}")
                    edits.append((where, f"{value:.{d}f}"))
            shown = ", ".join(f"{n}={computed.get(n, math.nan):.6f}" for n, _, _ in stored)
            print(f"{'DIFF' if bad else 'ok  '} {row_id}: {shown}" + (f"   [{'; '.join(bad)}]" if bad else ""))
            if bad:
                differing.append(row_id)
    if opts.check:
        if differing:
            print(f"FAILED: {len(differing)} rows differ from TRL: {', '.join(differing)}")
            return 1
        print("all recomputable rows match TRL")
        return 0
    for (start, end), text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    if edits:
        FIXTURES.write_text(source)
        print(f"rewrote {len(edits)} numbers in {FIXTURES.name}: {', '.join(differing)}")
    else:
        print(f"{FIXTURES.name} already holds TRL's numbers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
