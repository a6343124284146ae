"""The TRL drop-in on models whose output layer transforms its logits (gfpo_fast/lm_head.py): a Gemma 2 with
final-logit soft-capping and a Granite that divides its logits by ``logits_scaling`` train on the hidden-state
path (no fallback to full logits) exactly as TRL's own GRPOTrainer does (fp32, 1e-5), with the helpers of
``test_trl.py`` (tiny models from configs, a word-level tokenizer, two optimizer steps)."""
import pytest

pytest.importorskip("trl")

from test_trl import LossPaths, assert_same_training, save_tiny, tokenizer_and_sizes, train  # noqa: E402
from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from gfpo_fast.integrations.trl import FastGRPOTrainer  # noqa: E402
from gfpo_fast.lm_head import lm_head_of  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def loss_paths(monkeypatch):
    return LossPaths(monkeypatch)


def tiny_gemma2(tmp_path_factory):
    """Logits of a tiny random model are ~0.1: a cap of 0.1 bends them."""
    config = Gemma2Config(**tokenizer_and_sizes()[1], num_key_value_heads=1, head_dim=8,
                          final_logit_softcapping=0.1)
    return save_tiny(tmp_path_factory, Gemma2ForCausalLM, config)


def tiny_granite(tmp_path_factory):
    config = GraniteConfig(**tokenizer_and_sizes()[1], num_key_value_heads=1, logits_scaling=0.05)  # x20
    return save_tiny(tmp_path_factory, GraniteForCausalLM, config)


@pytest.mark.parametrize(("make", "transform"), [(tiny_gemma2, (1.0, 0.1)), (tiny_granite, (20.0, None))],
                         ids=["gemma2-softcap", "granite-scale"])
def test_transformed_logits_train_like_trl_on_the_hidden_path(tmp_path_factory, loss_paths, make, transform):
    model = make(tmp_path_factory)
    overrides = dict(loss_type="dapo", beta=0.04)
    reference = train(model, GRPOTrainer, **overrides)
    fast = train(model, FastGRPOTrainer, after_init=loss_paths.watch, **overrides)
    head = lm_head_of(fast[2].model)
    assert (head.scale, head.softcap) == pytest.approx(transform)
    assert fast[2]._gf_logits_reason is None
    assert_same_training(reference, fast)
    loss_paths.assert_hidden_path(micro_batches=2)
