import pytest
import torch
from diffusers import DiTTransformer2DModel
from scipy import stats

from speedit_scheduler.models import (
    DIT_PRESETS,
    count_parameters,
    create_dit,
    disable_internal_label_dropout,
    dit_config,
    drop_labels,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins


@pytest.mark.parametrize(
    "preset, depth, hidden, heads, patch",
    [("XL/2", 28, 1152, 16, 2), ("L/4", 24, 1024, 16, 4), ("B/8", 12, 768, 12, 8), ("S/2", 12, 384, 6, 2)],
)
def test_presets(preset, depth, hidden, heads, patch):
    config = dit_config(preset)
    assert config["num_layers"] == depth and config["patch_size"] == patch
    assert (
        config["num_attention_heads"] == heads
        and config["num_attention_heads"] * config["attention_head_dim"] == hidden
    )
    assert config["in_channels"] == 4 and config["out_channels"] == 8  # learned sigma
    assert config["num_embeds_ada_norm"] == 1000 and config["sample_size"] == 32 and config["norm_eps"] == 1e-6
    assert len(DIT_PRESETS) == 12


def test_parameter_counts_against_the_paper():
    """diffusers keeps one timestep/label embedder per block; with one shared embedder the count
    is the DiT paper's (XL/2 675M, S/2 33M)."""
    for preset, paper_m, ours_m in [("XL/2", 675, 749.8), ("S/2", 33, 39.8)]:
        with torch.device("meta"):
            model = DiTTransformer2DModel(**dit_config(preset))
        total = count_parameters(model)
        embedders = sum(p.numel() for n, p in model.named_parameters() if ".norm1.emb." in n)
        shared = total - embedders + embedders // model.config.num_layers
        assert total / 1e6 == pytest.approx(ours_m, abs=0.05)
        assert shared / 1e6 == pytest.approx(paper_m, rel=0.005)
        rows = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        assert rows == 1001  # 1000 classes + the null class


def test_bad_presets_raise():
    with pytest.raises(ValueError, match=r"model preset 'XXL/2' is unknown"):
        dit_config("XXL/2")
    with pytest.raises(ValueError, match=r"model preset 'XL/3' is unknown"):
        dit_config("XL/3")
    with pytest.raises(ValueError, match=r"sample_size=30 is not divisible by the patch size 4"):
        dit_config("S/4", sample_size=30)


def test_dit_initialisation(tiny_dit):
    model = tiny_dit()
    for block in model.transformer_blocks:
        assert torch.all(block.norm1.linear.weight == 0) and torch.all(block.norm1.linear.bias == 0)
        assert torch.all(block.attn1.to_q.bias == 0)
    assert torch.all(model.proj_out_2.weight == 0) and torch.all(model.proj_out_1.weight == 0)
    big = create_dit("S/2", seed=0, sample_size=8, in_channels=1, num_classes=1000, num_layers=1)
    table = big.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.std().item() == pytest.approx(0.02, rel=0.02)
    q = big.transformer_blocks[0].attn1.to_q.weight
    bound = (6 / (q.shape[0] + q.shape[1])) ** 0.5  # xavier-uniform
    assert q.abs().max().item() <= bound and q.abs().max().item() > 0.95 * bound
    x = torch.randn(2, 1, 8, 8)
    out = model(x, timestep=torch.tensor([1, 500]), class_labels=torch.tensor([0, 3])).sample
    assert out.shape == (2, 2, 8, 8) and torch.all(out == 0)  # adaLN-Zero starts at zero
    assert torch.equal(tiny_dit(seed=0).proj_out_1.weight, model.proj_out_1.weight)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


def test_label_dropout_happens_once_per_sample(tiny_dit):
    model = _perturbed(tiny_dit()).train()
    x = torch.randn(64, 1, 8, 8)
    t = torch.full((64,), 300)
    labels = torch.randint(0, 10, (64,))
    # Stock diffusers: in train mode every embedder call drops labels independently.
    torch.manual_seed(0)
    a = model(x, timestep=t, class_labels=labels).sample
    b = model(x, timestep=t, class_labels=labels).sample
    assert not torch.equal(a, b)
    disable_internal_label_dropout(model)
    a = model(x, timestep=t, class_labels=labels).sample
    b = model(x, timestep=t, class_labels=labels).sample
    assert torch.equal(a, b)
    # The null label of a dropped sample is a real unconditional example: same as eval mode.
    null = torch.full_like(labels, 10)
    train_null = model(x, timestep=t, class_labels=null).sample
    model.eval()
    torch.testing.assert_close(train_null, model(x, timestep=t, class_labels=null).sample)


def test_drop_labels_statistics():
    labels = torch.randint(0, 10, (100_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(1))
    is_null = dropped == 10
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert stats.binomtest(int(is_null.sum()), len(labels), 0.1).pvalue > 1e-3
    again = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(1))
    assert torch.equal(again, dropped)
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


def test_trained_model_behaves_identically_in_stock_diffusers(tmp_path, tiny_dit):
    model = disable_internal_label_dropout(_perturbed(tiny_dit()))
    model.save_pretrained(tmp_path)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.norm_eps == 1e-6
    model.eval()
    loaded.eval()
    x = torch.randn(3, 1, 8, 8)
    args = dict(timestep=torch.tensor([0, 10, 999]), class_labels=torch.tensor([1, 2, 10]))
    assert torch.equal(model(x, **args).sample, loaded(x, **args).sample)
