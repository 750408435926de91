# Copyright 2026 The speedit authors. Licensed under the Apache License, Version 2.0.
"""The export of a trained transformer as a diffusers pipeline folder, with the training
scheduler's config beside it; and the same pipeline built from any training checkpoint.

Every export loads with stock diffusers (`DiffusionPipeline.from_pretrained`), in a Python without
this project:

- a latent model with exactly 1000 classes is a stock `DiTPipeline` folder, as DiT's Hub
  checkpoints are (DiTPipeline hard-codes 1000 as the null class of guidance);
- every other model (pixel space, or latent with another number of classes) is a
  `SpeeDiTPipeline` folder that ships the pipeline's code as a diffusers custom pipeline:
  `pipeline_speedit.py` beside the components and `"_class_name": ["pipeline_speedit",
  "SpeeDiTPipeline"]` in model_index.json. The file is generated from this package's
  `pipeline_speedit.py` at every export (what it imports from the package inlined), so it samples
  exactly as the project's class does and cannot drift from it. diffusers runs a folder's own code
  only with `trust_remote_code=True`, from a local folder as from a Hub repo.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import sys

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from .. import __version__
from .. import pipeline_speedit as pipeline_module
from ..models import load_dit
from ..pipeline_speedit import SpeeDiTPipeline, training_sampler
from ..scheduling_speedit import SpeeDiTScheduler
from ..utils import atomic_write, atomic_write_json
from .checkpoints import TRAINING_SCHEDULER_FOLDER, checkpoint_transformer_folder, read_checkpoint_state

# The number of classes stock DiTPipeline can guide: it hard-codes 1000 as the null class.
STOCK_DIT_NUM_CLASSES = 1000
# The custom pipeline an export ships: <folder>/pipeline_speedit.py, class SpeeDiTPipeline.
CUSTOM_PIPELINE_MODULE = "pipeline_speedit"
CUSTOM_PIPELINE_CLASS = SpeeDiTPipeline.__name__
CUSTOM_PIPELINE_FILE = f"{CUSTOM_PIPELINE_MODULE}.py"
# What the shipped file may import: the standard library and these.
STANDALONE_IMPORTS = ("torch", "diffusers", "numpy")


def exported_pipeline_class(latent: bool, num_classes: int) -> str:
    """The pipeline class an export of a model uses: stock `DiTPipeline` for a latent model with
    the 1000 classes it can guide, the shipped `SpeeDiTPipeline` otherwise."""
    return "DiTPipeline" if latent and num_classes == STOCK_DIT_NUM_CLASSES else CUSTOM_PIPELINE_CLASS


def recorded_class_name(model_index: dict) -> str | None:
    """The pipeline class a model_index.json names: its `_class_name`, which is a plain name for a
    diffusers class and `[module, class]` for a custom pipeline shipped in the folder."""
    name = model_index.get("_class_name")
    return name[-1] if isinstance(name, (list, tuple)) else name


def ships_custom_pipeline(folder: str) -> bool:
    """Whether a pipeline folder carries its own pipeline code (and so loads with stock diffusers
    only with `trust_remote_code=True`)."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index) as f:
        name = json.load(f).get("_class_name")
    return isinstance(name, (list, tuple)) and os.path.isfile(os.path.join(folder, f"{name[0]}.py"))


def inference_scheduler(training_scheduler: SpeeDiTScheduler, latent: bool):
    """The scheduler saved with the pipeline.

    Latent models get a DDIM scheduler with the training schedule, as DiT's Hub checkpoints do,
    so stock `DiTPipeline` loads and runs them. Pixel models get DDPM ancestral sampling with the
    learned variance, as DiT samples for evaluation.
    """
    if latent:
        return training_sampler(training_scheduler, "ddim", learned_variance=True, clip_sample=False)
    return training_sampler(training_scheduler, "ddpm", learned_variance=True, clip_sample=True)


def build_pipeline(
    transformer: DiTTransformer2DModel,
    training_scheduler: SpeeDiTScheduler,
    class_names: list[str],
    vae: AutoencoderKL | None = None,
) -> DiTPipeline | SpeeDiTPipeline:
    """The pipeline of a trained transformer: `exported_pipeline_class` decides which, with the
    scheduler of `inference_scheduler` and the class names as `id2label`."""
    id2label = {i: name for i, name in enumerate(class_names)}
    latent = vae is not None
    scheduler = inference_scheduler(training_scheduler, latent=latent)
    if exported_pipeline_class(latent, transformer.config.num_embeds_ada_norm) == "DiTPipeline":
        pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        pipeline.register_to_config(id2label={str(k): v for k, v in id2label.items()})
        return pipeline
    return SpeeDiTPipeline(transformer=transformer, scheduler=scheduler, vae=vae, id2label=id2label)


def save_pipeline(
    pipeline: DiTPipeline | SpeeDiTPipeline, training_scheduler: SpeeDiTScheduler, output_dir: str
) -> None:
    """Write the pipeline folder and, beside it, the SpeeDiT training-scheduler config; a
    `SpeeDiTPipeline` folder also gets its code (`ship_custom_pipeline`)."""
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    if isinstance(pipeline, SpeeDiTPipeline):
        ship_custom_pipeline(output_dir)
    else:  # a stock folder carries no code, not even a stale copy of an earlier export's
        stale = os.path.join(output_dir, CUSTOM_PIPELINE_FILE)
        if os.path.isfile(stale):
            os.remove(stale)
    training_scheduler.save_pretrained(os.path.join(output_dir, TRAINING_SCHEDULER_FOLDER))


def ship_custom_pipeline(folder: str) -> None:
    """Make a saved `SpeeDiTPipeline` folder load with stock diffusers: write the standalone
    pipeline source as `pipeline_speedit.py` and name it in model_index.json as diffusers names a
    custom pipeline kept in the folder (`["pipeline_speedit", "SpeeDiTPipeline"]`)."""
    source = standalone_pipeline_source().encode()
    atomic_write(os.path.join(folder, CUSTOM_PIPELINE_FILE), lambda f: f.write(source))
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["_class_name"] = [CUSTOM_PIPELINE_MODULE, CUSTOM_PIPELINE_CLASS]
    atomic_write_json(index_path, index, indent=2, sort_keys=True)  # as diffusers writes it


# ------------------------------------------------------------------------------------------------
# the standalone pipeline source
# ------------------------------------------------------------------------------------------------
def standalone_pipeline_source() -> str:
    """The source of `speedit_scheduler/pipeline_speedit.py` as one file that imports only the
    standard library, torch, diffusers and numpy: each `from .module import name` of it is replaced
    by the definitions it needs from that module (the named ones and, transitively, the module's
    definitions and imports they use), copied verbatim.

    So the shipped pipeline runs the very code of `SpeeDiTPipeline`. Raises RuntimeError if the
    pipeline module ever needs what cannot be inlined this way (an aliased or star import, a
    definition that clashes with one of its own names, an import outside the allowed packages).
    """
    source = inspect.getsource(pipeline_module)
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    own_names = _bound_names(tree)
    replacements = []  # (first line, last line, text), 1-based and inclusive
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            module = importlib.import_module("." * node.level + (node.module or ""), pipeline_module.__package__)
            replacements.append((node.lineno, node.end_lineno, _inlined(module, node, own_names)))
    for first, last, text in reversed(replacements):
        lines[first - 1 : last] = [text]
    header = (
        "# Generated by speedit {version} from speedit_scheduler/pipeline_speedit.py, with what it imports from\n"
        "# the package inlined, so that diffusers loads it as this folder's custom pipeline without speedit\n"
        "# installed (it needs only torch, diffusers and numpy). Do not edit it: export the model again.\n"
    ).format(version=__version__)
    first_code = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    result = "".join(lines[:first_code]) + header + "".join(lines[first_code:])
    _check_standalone(result)
    return result


def _bound_names(tree: ast.Module) -> set[str]:
    """The names a module's top level binds (definitions, assignments, imports), but for the names
    its relative imports bind (those are what gets inlined)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.level == 0):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _inlined(module, node: ast.ImportFrom, own_names: set[str]) -> str:
    """The text that replaces `node` (`from .module import a, b`): the imports and definitions of
    `module` that a and b need, in the module's order, each definition with its leading comments."""
    wanted = []
    for alias in node.names:
        if alias.name == "*" or alias.asname not in (None, alias.name):
            raise RuntimeError(f"cannot inline `{ast.unparse(node)}`: import the names without alias")
        wanted.append(alias.name)
    source = inspect.getsource(module)
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    definitions, imports = {}, {}  # name -> node
    for item in tree.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            definitions[item.name] = item
        elif isinstance(item, (ast.Assign, ast.AnnAssign)):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    definitions[target.id] = item
        elif isinstance(item, (ast.Import, ast.ImportFrom)) and not (
            isinstance(item, ast.ImportFrom) and item.module == "__future__"
        ):
            for alias in item.names:
                imports[(alias.asname or alias.name).split(".")[0]] = (item, alias)
    needed, used_imports, todo = [], {}, list(wanted)
    while todo:
        name = todo.pop()
        if name in definitions:
            if definitions[name] in needed:
                continue
            if name in own_names:
                raise RuntimeError(f"cannot inline {name} from {module.__name__}: the pipeline module defines it too")
            needed.append(definitions[name])
            todo += [n.id for n in ast.walk(definitions[name]) if isinstance(n, ast.Name)]
        elif name in imports:
            item, alias = imports[name]
            if isinstance(item, ast.ImportFrom) and item.level > 0:
                raise RuntimeError(f"cannot inline {module.__name__}'s relative import of {name}")
            used_imports.setdefault(id(item), (item, []))
            if alias not in used_imports[id(item)][1]:
                used_imports[id(item)][1].append(alias)
        elif name in wanted:
            raise RuntimeError(f"cannot inline {name}: {module.__name__} defines no such name")
    import_lines = []
    for item, aliases in sorted(used_imports.values(), key=lambda pair: pair[0].lineno):
        kept = [alias for alias in item.names if alias in aliases]
        pruned = ast.ImportFrom(item.module, kept, 0) if isinstance(item, ast.ImportFrom) else ast.Import(kept)
        import_lines.append(ast.unparse(pruned) + "\n")
    blocks = []
    for item in sorted(needed, key=lambda n: n.lineno):
        first = min([item.lineno] + [d.lineno for d in getattr(item, "decorator_list", [])])
        while first > 1 and lines[first - 2].lstrip().startswith("#"):  # its comments ("Copied from ...")
            first -= 1
        blocks.append("".join(lines[first - 1 : item.end_lineno]))
    relative = module.__name__.replace(".", "/") + ".py"
    return (
        f"# ---- inlined from {relative}: {', '.join(wanted)} and what it needs ----\n"
        + "".join(import_lines)
        + "\n\n"
        + "\n\n".join(blocks)
        + f"\n\n# ---- end of the code inlined from {relative} ----\n"
    )


def _check_standalone(source: str) -> None:
    """Raise RuntimeError unless `source` parses and imports only the standard library and
    `STANDALONE_IMPORTS` (no relative import, nothing of this package)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            raise RuntimeError(f"the standalone pipeline still has a relative import: {ast.unparse(node)}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for module in modules:
                root = module.split(".")[0]
                if root not in STANDALONE_IMPORTS and root not in sys.stdlib_module_names:
                    raise RuntimeError(f"the standalone pipeline imports {module}, which diffusers users may lack")


# ------------------------------------------------------------------------------------------------
# from a training checkpoint
# ------------------------------------------------------------------------------------------------
def pipeline_from_checkpoint(
    path: str, use_ema: bool = True, torch_dtype: torch.dtype | None = None, vae: AutoencoderKL | None = None
) -> DiTPipeline | SpeeDiTPipeline:
    """The pipeline a training checkpoint exports: what `train_dit.py` would have written had it
    stopped at that step (EMA weights unless `use_ema=False`). Latent checkpoints load the VAE
    their training recorded, unless `vae` is given."""
    state = read_checkpoint_state(path)
    folder = checkpoint_transformer_folder(path, use_ema)
    transformer = load_dit(folder, dtype=torch_dtype)  # with a converted original's timestep sinusoid
    training_scheduler = SpeeDiTScheduler.from_pretrained(os.path.join(path, TRAINING_SCHEDULER_FOLDER))
    if vae is None and state.get("vae"):
        vae = AutoencoderKL.from_pretrained(state["vae"], dtype=torch_dtype)
    return build_pipeline(transformer, training_scheduler, state["class_names"], vae=vae)
