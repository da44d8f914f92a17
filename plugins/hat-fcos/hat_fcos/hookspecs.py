"""hat-fcos's own hooks: a third-party plugin adds a backbone, neck or head without touching
hat-fcos (register its type name with ``hat_components`` and implement the builder).

Added to the plugin manager through the core's ``hat_addhooks`` hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from hat_fcos.specs import BackboneSpec, HeadSpec, NeckSpec

hookspec = pluggy.HookspecMarker("hat")


@hookspec(firstresult=True)
def build_backbone(spec: BackboneSpec) -> nn.Module | None:
    """Build the backbone for ``spec.type``.

    Called by hat-fcos's ``build_model``. The module maps ``Tensor[B, 3, H, W]`` to the list of
    features at strides 2, 4, 8, 16, 32 and has ``out_channels: list[int]`` (one per feature).
    Stops at the first non-None result.

    :param spec: the structured ``[model.backbone]`` table.
    :returns: the backbone, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def build_neck(spec: NeckSpec, in_channels: list[int]) -> nn.Module | None:
    """Build the neck for ``spec.type``.

    The module maps the backbone's features to one feature per output level and has
    ``out_strides: list[int]`` and ``out_channels: int``. Stops at the first non-None result.

    :param spec: the structured ``[model.neck]`` table.
    :param in_channels: the backbone's ``out_channels``.
    :returns: the neck, or None when ``spec.type`` is not this plugin's.
    """


@hookspec(firstresult=True)
def build_head(
    spec: HeadSpec, in_channels: int, num_classes: int, strides: list[int]
) -> nn.Module | None:
    """Build the head for ``spec.type``.

    The module maps the neck's features to ``(cls, bbox, centerness)``, each a list over levels
    of raw ``Tensor[B, num_classes | 4 | 1, H, W]`` passed through DeQuantStubs. Stops at the
    first non-None result.

    :param spec: the structured ``[model.head]`` table.
    :param in_channels: channels of every neck output.
    :param num_classes: object classes.
    :param strides: the neck's output strides.
    :returns: the head, or None when ``spec.type`` is not this plugin's.
    """
