"""The JSON shapes of the API (pydantic): what it takes and what it answers, as the OpenAPI page shows them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ErrorResponse", "FeatureQuery", "GalleryItem", "Health", "Hit", "ImageQuery", "ModelInfo",
           "SearchResponse"]


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topk: int = Field(10, ge=1, description="results wanted (at most the server's max_topk; fewer if the gallery "
                      "or the camera filter leaves fewer)")
    camids: list[int] | None = Field(None, description="keep only gallery images of these cameras (camid, from 0, "
                                     "as in the results); none: every camera")


class FeatureQuery(_Query):
    """A search by feature: the query's feature vector (the index's size, e.g. 3072; re-normalised), as JSON
    numbers or as base64 of its float32 bytes; one of the two."""

    feature: list[float] | None = Field(None, description="the query feature as numbers, e.g. a row of cgpn "
                                        "extract's output")
    feature_base64: str | None = Field(None, description="the query feature as base64 of its little-endian float32 "
                                       "values (4 x D bytes; in Python `base64.b64encode(x.astype('<f4').tobytes())`): "
                                       "half the bytes of `feature`, and cheaper for the server to read")


class ImageQuery(_Query):
    """A search by image (multipart/form-data): the image file in the field ``image``."""


class GalleryItem(BaseModel):
    """One gallery image: its index id, file name, and identity / camera when its name carries them."""

    id: int = Field(..., description="row of the index (0 to size - 1): the image is at /api/gallery/{id}/image")
    name: str = Field(..., description="the image's file name")
    pid: int | None = Field(None, description="identity, from a Market-1501 style name (None: unknown)")
    camid: int | None = Field(None, description="camera, counted from 0 (None: unknown)")


class Hit(GalleryItem):
    """One result: a gallery image with its rank and its closeness to the query."""

    rank: int = Field(..., description="1 for the nearest")
    score: float = Field(..., description="cosine similarity of the two features (what cgpn search --json prints)")
    distance: float = Field(..., description="Euclidean distance of the L2-normalised features, sqrt(2 - 2 score), "
                            "0 to 2 (what cgpn show prints)")


class SearchResponse(BaseModel):
    """The ranked results of one search, nearest first."""

    topk: int
    camids: list[int] | None
    results: list[Hit]


class ModelInfo(BaseModel):
    """The network that embeds image queries."""

    checkpoint: str = Field(..., description="file name of the checkpoint")
    name: str = Field(..., description="model variant and backbone, e.g. cgpn/resnet50")
    input_size: list[int] = Field(..., description="(height, width) the images are resized to")
    backend: str = Field(..., description="inference path (eager, bf16, onnx...)")
    device: str


class Health(BaseModel):
    """What the server serves."""

    status: str = "ok"
    gallery_size: int
    dim: int = Field(..., description="feature size; a feature query must have this many values")
    index_kind: str = Field(..., description="flat (exact), ivf or ivfpq (approximate)")
    first_pass: str | None = Field(..., description="flat: the first pass a search of one query starts from (int8 "
                                   "or bf16 scores with a proven error bound; the same results as fp32, a quarter "
                                   "or half the memory read); null: an fp32 pass")
    first_pass_by_batch: dict[str, str | None] = Field(..., description="flat: the first pass (null: fp32) a search "
                                                       "of this many queries at once starts from, per batch size "
                                                       "bucket (1, 2, 4, ...; the fastest, timed at start)")
    cameras: list[int] = Field(..., description="camids present in the gallery (empty: names carry none)")
    queries: int = Field(..., description="images of the --queries folder (0: none given)")
    max_topk: int
    model: ModelInfo
    searches: int = Field(..., description="queries searched since the start")
    search_batches: int = Field(..., description="index searches that served them (concurrent queries share one)")
    search_seconds: float = Field(..., description="time spent in those index searches")
    searches_waiting: int = Field(..., description="queries queued for the next index search")


class ErrorResponse(BaseModel):
    """Every refused request: one line that says what was expected, what came and what to do."""

    detail: str
