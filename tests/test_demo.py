"""The README demo's code path, shortened: a run of its own (the slowest test), so that pytest's
two workers share the suite evenly."""

import os

import pytest
import torch

import train_dit

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # a small model: one thread is faster


def test_shortened_demo_generates_recognisable_digits(tmp_path):
    """The README demo's code path, shortened: class-conditional samples land in their class."""
    from speedit_scheduler import SpeeDiTPipeline
    from speedit_scheduler.data.datasets import load_digits_dataset
    from speedit_scheduler.evaluation.metrics import ReferenceClassifier

    out = tmp_path / "demo"
    args = train_dit.parse_args(
        [
            "--demo",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "800",
            "--ema_decay",
            "0.99",
            "--report_to",
            "none",
            "--validation_inference_steps",
            "20",
            "--validation_images_per_class",
            "2",
        ]
    )
    train_dit.main(args)
    assert os.path.isfile(out / "samples.png")
    digits = load_digits_dataset()
    classifier = ReferenceClassifier(digits.samples.float() / 255, digits.labels)
    pipe = SpeeDiTPipeline.from_pretrained(out)
    labels = [c for c in range(10) for _ in range(10)]
    images = pipe(
        class_labels=labels,
        guidance_scale=2.0,
        num_inference_steps=50,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    accuracy = classifier.accuracy(images, labels)
    print(f"shortened demo: classifier accuracy of samples {accuracy:.3f} (chance 0.1)")
    assert accuracy > 0.5
