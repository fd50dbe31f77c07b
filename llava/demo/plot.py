"""Loss curves drawn with PIL alone (no plotting dependency): one panel per training step of the demo."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

_INK = (40, 40, 40)
_GRID = (225, 225, 225)
_RAW = (160, 190, 230)
_SMOOTH = (25, 90, 190)


@dataclass
class Panel:
    title: str
    points: Sequence[tuple[float, float]]  # (step, loss)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _smooth(values: Sequence[float], half_window: int) -> list[float]:
    """Centred moving average (no lag, unlike an exponential one); the window shrinks at the ends."""
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half_window), min(len(values), i + half_window + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel, fonts) -> None:
    title_font, tick_font = fonts
    left, top, right, bottom = box
    draw.text((left + 60, top + 4), panel.title, fill=_INK, font=title_font)
    x0, y0, x1, y1 = left + 60, top + 34, right - 16, bottom - 34  # plot area
    points = [(s, v) for s, v in panel.points if v == v and math.isfinite(v)]
    if not points:
        draw.text((x0, (y0 + y1) // 2), "no data", fill=_INK, font=tick_font)
        return
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    s_lo, s_hi = min(steps), max(steps)
    if s_hi == s_lo:
        s_hi = s_lo + 1
    y_ticks = _nice_ticks(min(0.0, min(losses)), max(losses))
    v_lo, v_hi = y_ticks[0], max(y_ticks[-1], max(losses))

    def xy(step: float, value: float) -> tuple[float, float]:
        return (
            x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0),
            y1 - (value - v_lo) / (v_hi - v_lo) * (y1 - y0),
        )

    for tick in y_ticks:
        _, y = xy(s_lo, tick)
        draw.line((x0, y, x1, y), fill=_GRID)
        draw.text((x0 - 8, y), f"{tick:g}", fill=_INK, font=tick_font, anchor="rm")
    for tick in _nice_ticks(s_lo, s_hi):
        x, _ = xy(tick, v_lo)
        if x0 - 1 <= x <= x1 + 1:
            draw.line((x, y1, x, y1 + 4), fill=_INK)
            draw.text((x, y1 + 6), f"{tick:g}", fill=_INK, font=tick_font, anchor="ma")
    draw.rectangle((x0, y0, x1, y1), outline=_INK)
    draw.text(((x0 + x1) // 2, bottom - 14), "step", fill=_INK, font=tick_font, anchor="ma")
    if len(points) > 1:
        draw.line([xy(s, v) for s, v in points], fill=_RAW, width=1)
        smooth = _smooth(losses, max(1, len(points) // 40))
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=_SMOOTH, width=2)
    else:
        x, y = xy(*points[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=_SMOOTH)
    last = losses[-1]
    draw.text((x1 - 4, y0 + 4), f"last {last:.3f}", fill=_SMOOTH, font=tick_font, anchor="ra")


def save_loss_curves(panels: Sequence[Panel], path: str, title: str = "", columns: int = 2) -> str:
    """Draw `panels` (training loss against step) in a grid and save a PNG at `path`."""
    if not panels:
        raise ValueError("save_loss_curves needs at least one panel.")
    width, height = 480, 300
    rows = math.ceil(len(panels) / columns)
    head = 40 if title else 0
    image = Image.new("RGB", (columns * width, rows * height + head), "white")
    draw = ImageDraw.Draw(image)
    fonts = (_font(16), _font(12))
    if title:
        draw.text((columns * width // 2, 10), title, fill=_INK, font=_font(20), anchor="ma")
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        _draw_panel(draw, (c * width, head + r * height, (c + 1) * width, head + (r + 1) * height), panel, fonts)
    image.save(path)
    return path
