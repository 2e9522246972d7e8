"""The viewer's attention tab: the EPA blocks and heads to choose from, the maps at the crosshair (drawn by
`unetrpp.visualize_attention`) and clicks on them."""

from __future__ import annotations

from .. import visualize as vis
from .session import Session


def attention_choices(model) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Dropdown choices (label, value): the model's EPA blocks by index, and heads (0 = mean of heads)."""
    from .. import visualize_attention as va

    names = va.attention_blocks(model)
    blocks = [(va.block_label(n, model.get_submodule(n).grid), i) for i, n in enumerate(names)]
    heads = [("mean of heads", 0)] + [(f"head {h}", h) for h in range(1, model.config.num_heads + 1)]
    return blocks, heads


def attention_view(model, session: Session, block: int | None, head: int | None):
    """The network's part of the attention tab (what a GPU runs): the `visualize_attention.AttentionView`
    of the crosshair voxel. `block` indexes `attention_choices`; `head` 0/None is the mean of heads.
    It leaves `session` as it was, so it may run on a copy (a ZeroGPU worker gets one)."""
    from .. import visualize_attention as va

    names = va.attention_blocks(model)
    if block is not None and not 0 <= int(block) < len(names):
        raise ValueError(f"block={block}: must be in [0, {len(names) - 1}]")
    head_index = None if not head else int(head) - 1
    return va.compute_attention(model, session.volume, session.spacing, session.position, names[int(block or 0)],
                                head_index, session.orientation)


def show_attention(session: Session, view, head: int | None, window: tuple[float, float]) -> list:
    """The attention tab drawn from `attention_view`'s result: three heat-map views (RGB), the
    channel-attention figure and a caption; the session remembers the view for clicks on it."""
    from .. import visualize_attention as va

    # the voxel the maps were computed at, not session.position: the crosshair may have moved meanwhile
    centre = view.centre if view.centre is not None else tuple(session.position)
    session.attention = (view, centre)
    label = va.block_label(view.block, view.grid)
    caption = (f"Query voxel (z, y, x) = {centre} at the centre of the "
               f"{' x '.join(map(str, view.window_hu.shape))} window; {label}; "
               f"{f'head {int(head)}' if head else 'mean of heads'}. Heat-map: the query's "
               "attention weight (no unit), from its minimum (clear) to its maximum in this window (bright yellow).")
    return [*(va.render_attention(view, v, window) for v in vis.VIEWS),
            va.channel_figure(view.channel, f"channel attention<br>{label}"), caption]  # two lines fit a phone


def attention_click(session: Session, view: str, col: float, row: float) -> Session:
    """Move the crosshair to the voxel under a click on an attention view (of the last window shown)."""
    from .. import visualize_attention as va

    if session.attention is None:
        raise ValueError("no attention map shown yet: press 'Show attention at the crosshair' first")
    att, centre = session.attention
    session.position = list(va.window_click_to_voxel(att, view, col, row, centre, session.spacing,
                                                     session.volume.shape))
    return session
