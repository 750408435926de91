"""The training engine: its compiled path (model and loss as one graph) trains what the eager
path trains, and it is the step the throughput benchmark times."""

import pytest
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from speedit_scheduler import SpeeDiTScheduler
from speedit_scheduler.data import DeterministicOrder, load_training_data
from speedit_scheduler.losses import DiTLoss
from speedit_scheduler.models import create_dit, disable_internal_label_dropout, null_class_label
from speedit_scheduler.training.ema import create_ema
from speedit_scheduler.training.engine import TrainingEngine
from speedit_scheduler.utils import seeded_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def train(steps: int, compile: bool, preset: str = "speed", grad_accumulation: int = 1):
    """A tiny DiT trained by the engine on digits, as train_dit.py's loop drives it."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accumulation)
    dataset = load_training_data("digits", None)
    model = create_dit("S/2", seed=0, sample_size=8, in_channels=1, num_classes=10, num_layers=1, hidden_size=32,
                       num_attention_heads=2)  # fmt: skip
    disable_internal_label_dropout(model)
    noise_scheduler = SpeeDiTScheduler.from_preset(preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    ema = create_ema(model, 0.9)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    engine = TrainingEngine(accelerator, model, optimizer, lr_scheduler, noise_scheduler, DiTLoss(noise_scheduler), ema,
                            class_dropout_prob=0.1, null_label=null_class_label(model), max_grad_norm=1.0, seed=0,
                            compile=compile)  # fmt: skip
    order = DeterministicOrder(len(dataset), 8, 1, 0)
    losses = []
    for micro_step in range(steps * grad_accumulation):
        batch = dataset.get_batch(order.indices(micro_step, 0), seeded_generator("data", 0, 0, micro_step))
        losses.append(engine.step(batch["samples"], batch["class_labels"], micro_step).loss.item())
    return engine, losses, [p.detach().clone() for p in ema.shadow_params]


def test_compiled_step_trains_what_the_eager_step_trains(monkeypatch):
    """With dynamo's eager backend (the same kernels), the compiled ModelWithLoss gives the eager
    step's losses and EMA weights, so every caller's --compile trains the same model."""
    real_compile = torch.compile
    calls = []

    def compile_eagerly(module, backend="inductor", mode=None):
        calls.append(type(module).__name__)
        return real_compile(module, backend="eager")

    _, eager_losses, eager_ema = train(4, compile=False)
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    engine, compiled_losses, compiled_ema = train(4, compile=True)
    assert calls == ["ModelWithLoss"] and engine.model_with_loss is not None
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    for a, b in zip(compiled_ema, eager_ema):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_engine_bookkeeping_and_accumulation():
    """The log window's mean is the mean of the micro-steps' losses; with gradient accumulation
    the EMA steps once per optimizer step; a NaN names the optimizer step it happened in."""
    engine, losses, _ = train(3, compile=False, grad_accumulation=2)
    assert engine.ema.optimization_step == 3
    mean = sum(losses) / len(losses)
    assert abs(engine.read_logs()["loss"] - mean) < 1e-6 and engine.read_logs()["loss"] == 0.0  # read, then reset
    assert abs(engine.mean_loss("evaluation") - mean) < 1e-6  # a window of its own
    engine.check_finite()  # all finite: no error
    engine.first_bad_step.fill_(2)
    with pytest.raises(FloatingPointError, match="NaN or inf at step 2"):
        engine.check_finite()
