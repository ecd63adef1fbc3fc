"""The model a command runs on: built from ``--arch``/``--model``, weights loaded strictly.

Nothing here prints: bad input raises :class:`bnfix.cli.errors.BadInput`. Nothing is downloaded
either: torchvision builders get ``weights=None`` (and ``weights_backbone=None`` where they take a
pretrained backbone, as the segmentation and detection models do), timm's ``pretrained=False``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfix.cli.checkpoint import Checkpoint, apply_state_dict, load_checkpoint
from bnfix.cli.errors import BadInput, fail, first_line
from bnfix.layers import bn_layers

__all__ = ["build_model", "load_model", "load_other_model"]


def _builder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as error:
        fail(f"Expected --model-kwargs to be a JSON object, but it does not parse: {error}")
    if not isinstance(kwargs, dict):
        fail(f"Expected --model-kwargs to be a JSON object, but got {args.model_kwargs!r}")
    if args.num_classes is not None:
        if args.num_classes < 1:
            fail(f"Expected --num-classes to be a positive int, but got {args.num_classes}")
        if kwargs.get("num_classes", args.num_classes) != args.num_classes:
            fail("--num-classes and --model-kwargs give different num_classes; pass one")
        kwargs["num_classes"] = args.num_classes
    return kwargs


def _import_builder(spec: str) -> Callable[..., Any]:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        fail(
            f"Expected --model as MODULE:FN (e.g. mypkg.models:build or models.py:build), but got {spec!r}"
        )
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                fail(f"--model file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except BadInput:
        raise
    except Exception as error:
        fail(
            f"Cannot import {module_name} for --model: {type(error).__name__}: {first_line(error)}"
        )
    builder = getattr(module, attr, None)
    if not callable(builder):
        fail(f"--model: {module_name} has no callable {attr!r}")
    return builder


def build_model(args: argparse.Namespace) -> nn.Module:
    """The (randomly initialized) model named by --arch or --model."""
    kwargs = _builder_kwargs(args)
    if args.arch and args.model:
        fail("Pass either --arch or --model, not both")
    try:
        if args.model:
            model = _import_builder(args.model)(**kwargs)
        elif args.arch.startswith("timm:"):
            try:
                import timm
            except ImportError:
                fail(f"--arch {args.arch} needs timm, which is not installed (pip install timm)")
            model = timm.create_model(args.arch[5:], pretrained=False, **kwargs)
        else:
            import torchvision

            if args.arch not in torchvision.models.list_models():
                fail(
                    f"Unknown --arch {args.arch!r}: expected a torchvision model name (torchvision.models.list_models()) or timm:NAME"
                )
            builder = torchvision.models.get_model_builder(args.arch)
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs.setdefault("weights_backbone", None)  # its default downloads a backbone
            model = builder(weights=None, **kwargs)
    except BadInput:
        raise
    except Exception as error:
        fail(
            f"Building the model failed: {type(error).__name__}: {first_line(error)}; check "
            "--model-kwargs/--num-classes"
        )
    if not isinstance(model, nn.Module):
        fail(f"Expected the --model builder to return an nn.Module, but got {type(model).__name__}")
    return model


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Checkpoint]:
    """Load CKPT, build the model, load the weights strictly, move it to ``device`` in eval mode."""
    checkpoint = load_checkpoint(args.checkpoint, key=args.key, trust=args.trust_checkpoint)
    if checkpoint.module is not None:
        if args.arch or args.model:
            fail(f"{args.checkpoint} holds a whole pickled model; drop --arch/--model")
        model = checkpoint.module
    else:
        if not args.arch and not args.model:
            fail(
                f"{args.checkpoint} holds only weights; pass --arch NAME (a torchvision model) or --model MODULE:FN to build the model"
            )
        model = build_model(args)
        apply_state_dict(model, checkpoint, prefix=args.prefix)
    if not bn_layers(model):
        fail(
            f"The model in {args.checkpoint} has no BatchNorm layer that tracks running statistics; nothing to recalibrate"
        )
    return model.to(device).eval(), checkpoint


def load_other_model(args: argparse.Namespace, path: str, device: torch.device) -> nn.Module:
    """The model of CKPT again (same --arch/--model options), with the weights in ``path``."""
    return load_model(argparse.Namespace(**{**vars(args), "checkpoint": path}), device)[0]
