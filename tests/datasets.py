"""A small LoRA-training dataset (colored shapes with captions) for tests and benches."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = [("circle", (220, 40, 40)), ("square", (40, 200, 60)), ("triangle", (40, 80, 230)), ("ring", (230, 200, 40))]


def write_dataset(folder: Path, count: int = 4) -> Path:
    """Colored shapes on dark backgrounds (80x64: not square, so they get cropped)."""
    folder.mkdir(parents=True)
    for name, color in SHAPES[:count]:
        img = Image.new("RGB", (80, 64), (20, 20, 30))
        draw = ImageDraw.Draw(img)
        if name == "triangle":
            draw.polygon([(40, 8), (70, 56), (10, 56)], fill=color)
        elif name == "square":
            draw.rectangle((20, 12, 60, 52), fill=color)
        else:
            draw.ellipse((16, 8, 64, 56), fill=color, outline=(255, 255, 255), width=6 if name == "ring" else 0)
        img.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} in the easel style")
    return folder
