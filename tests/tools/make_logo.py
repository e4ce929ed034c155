"""Draw misp2defender_small.png with nothing but the standard library.

The logo: a small MISP-style node graph on the left, an arrow, and a Defender-style shield with a
check mark on the right, on a transparent background.  Shapes are filled as polygons and circles
by a scanline filler on a canvas ``SS`` times larger than the image, and the canvas is then box
filtered down (supersampling anti-aliasing).  The PNG is written by hand with ``zlib`` and
``struct``.

Usage::

    python tests/tools/make_logo.py [output.png]      # default: misp2defender_small.png at the repo root
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from pathlib import Path

W, H = 320, 128  # output size in pixels
SS = 4  # supersampling factor per axis

Color = tuple[int, int, int]
Point = tuple[float, float]

NODE = (0x1F, 0x4E, 0x79)  # dark blue: MISP side
EDGE = (0x5B, 0x7F, 0xA6)
ARROW = (0xF2, 0x8C, 0x28)  # orange: the sync
SHIELD = (0x00, 0x78, 0xD4)  # Defender blue
SHIELD_IN = (0xFF, 0xFF, 0xFF)
CHECK = (0x10, 0x7C, 0x10)  # green check


class Canvas:
    """A supersampled RGBA canvas; shapes are painted with hard edges at the high resolution."""

    def __init__(self, width: int, height: int, ss: int) -> None:
        self.w, self.h, self.ss = width * ss, height * ss, ss
        self.rows = [bytearray(self.w * 4) for _ in range(self.h)]  # transparent black

    def _span(self, y: int, x0: float, x1: float, rgba: bytes) -> None:
        a = max(0, math.ceil(x0 - 0.5))
        b = min(self.w, math.floor(x1 - 0.5) + 1)
        if b > a:
            self.rows[y][a * 4:b * 4] = rgba * (b - a)

    def polygon(self, pts: list[Point], color: Color) -> None:
        """Fill a polygon (even-odd rule); ``pts`` are in output-pixel coordinates."""
        s = self.ss
        p = [(x * s, y * s) for x, y in pts]
        rgba = bytes((*color, 255))
        edges = list(zip(p, p[1:] + p[:1], strict=True))
        ys = [q[1] for q in p]
        for y in range(max(0, int(min(ys))), min(self.h, int(max(ys)) + 2)):
            yc = y + 0.5
            xs = []
            for (x0, y0), (x1, y1) in edges:
                if (y0 <= yc < y1) or (y1 <= yc < y0):
                    xs.append(x0 + (yc - y0) * (x1 - x0) / (y1 - y0))
            xs.sort()
            for k in range(0, len(xs) - 1, 2):
                self._span(y, xs[k], xs[k + 1], rgba)

    def circle(self, cx: float, cy: float, r: float, color: Color) -> None:
        s = self.ss
        cx, cy, r = cx * s, cy * s, r * s
        rgba = bytes((*color, 255))
        for y in range(max(0, int(cy - r)), min(self.h, int(cy + r) + 2)):
            dy = y + 0.5 - cy
            if abs(dy) < r:
                dx = math.sqrt(r * r - dy * dy)
                self._span(y, cx - dx, cx + dx, rgba)

    def line(self, a: Point, b: Point, width: float, color: Color, round_caps: bool = True) -> None:
        (x0, y0), (x1, y1) = a, b
        length = math.hypot(x1 - x0, y1 - y0)
        nx, ny = -(y1 - y0) / length * width / 2, (x1 - x0) / length * width / 2
        self.polygon([(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)], color)
        if round_caps:
            self.circle(x0, y0, width / 2, color)
            self.circle(x1, y1, width / 2, color)

    def downsample(self) -> list[bytes]:
        """Box filter to the output size (premultiplied alpha), one RGBA row per output line."""
        s = self.ss
        n = s * s
        out = []
        for oy in range(self.h // s):
            band = self.rows[oy * s:(oy + 1) * s]
            row = bytearray()
            for ox in range(self.w // s):
                r = g = b = a = 0
                lo, hi = ox * s * 4, (ox + 1) * s * 4
                for src in band:
                    px = src[lo:hi]
                    for k in range(0, len(px), 4):
                        al = px[k + 3]
                        if al:
                            r += px[k] * al
                            g += px[k + 1] * al
                            b += px[k + 2] * al
                            a += al
                if a:
                    row += bytes((r // a, g // a, b // a, (a + n // 2) // n))
                else:
                    row += b"\0\0\0\0"
            out.append(bytes(row))
        return out


def bezier(p0: Point, p1: Point, p2: Point, steps: int = 24) -> list[Point]:
    """Quadratic Bezier from p0 (excluded) to p2 (included)."""
    pts = []
    for i in range(1, steps + 1):
        t = i / steps
        u = 1 - t
        pts.append((u * u * p0[0] + 2 * u * t * p1[0] + t * t * p2[0],
                    u * u * p0[1] + 2 * u * t * p1[1] + t * t * p2[1]))
    return pts


def shield(cx: float, top: float, half_w: float, height: float) -> list[Point]:
    """Outline of a heater shield: arched top, straight sides, curved flanks meeting at a point."""
    left, right = cx - half_w, cx + half_w
    shoulder = top + height * 0.12
    side_end = top + height * 0.45
    bottom = top + height
    pts: list[Point] = [(left, shoulder)]
    pts += bezier((left, shoulder), (cx, top - height * 0.12), (right, shoulder))
    pts.append((right, side_end))
    pts += bezier((right, side_end), (right - half_w * 0.05, top + height * 0.85), (cx, bottom))
    pts += bezier((cx, bottom), (left + half_w * 0.05, top + height * 0.85), (left, side_end))
    return pts


def draw() -> list[bytes]:
    c = Canvas(W, H, SS)

    # MISP side: a small graph of threat-intel nodes.
    nodes = {"a": (30.0, 34.0), "b": (26.0, 96.0), "c": (84.0, 64.0), "d": (70.0, 18.0), "e": (62.0, 108.0)}
    for u, v in (("a", "c"), ("b", "c"), ("a", "b"), ("d", "c"), ("e", "c"), ("a", "d")):
        c.line(nodes[u], nodes[v], 4.0, EDGE)
    for name, (x, y) in nodes.items():
        r = 15.0 if name == "c" else 9.5
        c.circle(x, y, r, NODE)
        c.circle(x, y, r * 0.45, (0xFF, 0xFF, 0xFF))

    # The sync arrow.
    c.line((110.0, 64.0), (176.0, 64.0), 10.0, ARROW, round_caps=False)
    c.circle(110.0, 64.0, 5.0, ARROW)
    c.polygon([(172.0, 46.0), (200.0, 64.0), (172.0, 82.0)], ARROW)

    # Defender side: the shield with a check mark.
    c.polygon(shield(258.0, 12.0, 46.0, 108.0), SHIELD)
    c.polygon(shield(258.0, 21.0, 36.0, 88.0), SHIELD_IN)
    c.line((240.0, 62.0), (253.0, 76.0), 9.0, CHECK)
    c.line((253.0, 76.0), (277.0, 47.0), 9.0, CHECK)
    return c.downsample()


def png_bytes(rows: list[bytes], width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + r for r in rows)  # filter type 0 on every scanline
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2] / "misp2defender_small.png"
    out.write_bytes(png_bytes(draw(), W, H))
    print(f"wrote {out} ({W}x{H}, {out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
