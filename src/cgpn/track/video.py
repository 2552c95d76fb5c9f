"""Frames in and out: a folder of images or a video file (decoded by PyAV) as RGB frames, and tracks drawn
into an mp4 (H.264) or GIF for a person to look at."""

from __future__ import annotations

import configparser
import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cgpn.data.datasets.base import IMAGE_SUFFIXES
from cgpn.data.loader import read_image
from cgpn.errors import ConfigError, DatasetError, DependencyError, ImageError
from cgpn.files import atomic_path

__all__ = ["VIDEO_OUTPUTS", "FrameSource", "draw_tracks", "video_writer"]

VIDEO_OUTPUTS = (".mp4", ".gif")  # what --video writes: H.264 mp4, or an animated GIF
DEFAULT_FPS = 25.0  # a folder of frames without a seqinfo.ini


def _import_av():
    try:
        import av
    except ImportError:
        raise DependencyError("reading or writing video needs PyAV: pip install 'cgpn[track]'") from None
    return av


def _frame_order(path: Path) -> tuple[int, str]:
    """Frames sort by the number in their name (``2.jpg`` before ``10.jpg``), then by name."""
    return (int(path.stem), path.name) if path.stem.isdigit() else (math.inf, path.name)


class FrameSource:
    """The frames of a sequence, in order, as (H, W, 3) uint8 RGB arrays.

    Args:
        path: a folder of image files (MOTChallenge's ``img1/``: ``000001.jpg`` ...; frame t is the t-th name
            in numeric order) or a video file any FFmpeg build reads (mp4, avi, mkv, webm, gif...).

    Attributes:
        num_frames: the number of frames, or None when a video does not say (known after reading it).
        fps: frames per second (a video's own; a folder's from ``../seqinfo.ini``, else 25).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted((p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                                key=_frame_order)
            if not self.files:
                hint = "; a MOTChallenge sequence keeps them in img1/" if (self.path / "img1").is_dir() else ""
                raise DatasetError(f"frames folder '{self.path}' holds no image (expected 000001.jpg, 000002.jpg... "
                                   f"ending in {', '.join(IMAGE_SUFFIXES)}{hint})")
            self.num_frames: int | None = len(self.files)
            self.fps = self._seqinfo_fps()
        elif self.path.is_file():
            self.files = []
            with self._open() as (_, stream):
                self.num_frames = int(stream.frames) or None
                self.fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        else:
            raise DatasetError(f"frames '{self.path}' do not exist (expected a folder of images or a video file)")

    def _seqinfo_fps(self) -> float:
        ini = self.path.parent / "seqinfo.ini"
        parser = configparser.ConfigParser()
        with contextlib.suppress(configparser.Error, OSError, ValueError, KeyError):
            parser.read(ini)
            return float(parser["Sequence"]["frameRate"])
        return DEFAULT_FPS

    @contextlib.contextmanager
    def _open(self):
        av = _import_av()
        try:
            container = av.open(str(self.path))
        except (av.FFmpegError, UnicodeDecodeError) as err:
            raise ImageError(f"cannot decode video '{self.path}': {err.__class__.__name__}: "
                             f"{getattr(err, 'strerror', None) or err} (expected a video file such as mp4)") from None
        try:
            if not container.streams.video:
                raise ImageError(f"'{self.path}' holds no video stream (expected a video file such as mp4)")
            yield container, container.streams.video[0]
        finally:
            container.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.files:
            for path in self.files:
                yield np.array(read_image(str(path)))  # writable: torch.from_numpy warns on read-only arrays
            return
        av = _import_av()
        count = 0
        with self._open() as (container, stream):
            try:
                for frame in container.decode(stream):
                    count += 1
                    yield frame.to_ndarray(format="rgb24")
            except av.FFmpegError as err:
                raise ImageError(f"cannot decode frame {count + 1} of video '{self.path}': "
                                 f"{getattr(err, 'strerror', None) or err}") from None
        if not count:
            raise ImageError(f"video '{self.path}' holds no decodable frame")
        self.num_frames = count


@contextlib.contextmanager
def video_writer(path: str | Path, fps: float) -> Iterator[Callable[[np.ndarray], None]]:
    """A function that appends an (H, W, 3) uint8 RGB frame to the video ``path`` (.mp4: H.264; .gif); the file
    appears whole when the block ends, and not at all if it raises."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_OUTPUTS:
        raise ConfigError(f"--video must end in {' or '.join(VIDEO_OUTPUTS)}, got '{path}'")
    av = _import_av()
    gif = path.suffix.lower() == ".gif"
    rate = max(1, round(fps))
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), mode="w")
        stream = None
        try:
            def write(rgb: np.ndarray) -> None:
                nonlocal stream
                if stream is None:
                    stream = container.add_stream("gif" if gif else "libx264", rate=rate)
                    height, width = rgb.shape[:2]
                    even = 1 if gif else 2  # H.264 in yuv420p needs even sizes: drop a last odd row / column
                    stream.height, stream.width = height // even * even, width // even * even
                    stream.pix_fmt = "rgb8" if gif else "yuv420p"
                rgb = np.ascontiguousarray(rgb[:stream.height, :stream.width])
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))

            yield write
            if stream is not None:
                container.mux(stream.encode())  # flush
        finally:
            container.close()


def _colour(track_id: int) -> tuple[int, int, int]:
    """A bright colour per track id, different for neighbouring ids."""
    hue = (track_id * 0.618033988749895) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 255)).convert("RGB").getpixel((0, 0))
    return tuple(rgb)


def draw_tracks(image: np.ndarray, ids: np.ndarray, ltwh: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) RGB with each box (``ltwh`` (N, 4)) framed in its id's colour and labelled."""
    out = Image.fromarray(image)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, image.shape[0] // 30))
    for track_id, (left, top, width, height) in zip(ids.tolist(), ltwh.tolist()):
        colour = _colour(track_id)
        draw.rectangle([left, top, left + width, top + height], outline=colour, width=2)
        label = str(track_id)
        x0, y0, x1, y1 = draw.textbbox((left, top), label, font=font)
        draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], fill=colour)
        draw.text((left, top), label, fill=(0, 0, 0), font=font)
    return np.asarray(out)
