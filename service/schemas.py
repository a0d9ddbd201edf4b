"""Request and response bodies (pydantic), with OpenAPI examples."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_TINY_PNG = (  # a 16x16 orange square
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mM8UaHBQApgYiARjGoY1TB0"
    "NAAAgJwBiHEHVqAAAAAASUVORK5CYII="
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HFParameters(_Body):
    """The Hugging Face zero-shot-image-classification ``parameters``."""

    candidate_labels: list[str] | None = Field(default=None, description="labels for this request only")
    hypothesis_template: str | None = Field(default=None, description="e.g. 'This is a photo of {}.'")
    top_k: int | None = Field(default=None, ge=1, strict=True, description='an integer: not true, not "3"')


class ClassifyRequest(_Body):
    """JSON classify request: our shape (``images``) or Hugging Face's (``inputs`` + ``parameters``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": [_TINY_PNG], "label_set": "default", "top_k": 3},
                {"images": [_TINY_PNG], "candidate_labels": ["cat", "dog"], "hypothesis_template": "a photo of a {}."},
                {"inputs": _TINY_PNG, "parameters": {"candidate_labels": ["cat", "dog"]}},
            ]
        },
    )

    images: list[str] | None = Field(default=None, description="base64 or data: URI per image (URLs are refused)")
    inputs: str | list[str] | None = Field(default=None, description="Hugging Face shape: one image or a list")
    parameters: HFParameters | None = None
    label_set: str = Field(default="default", description="named label set to classify against")
    top_k: int = Field(
        default=5, ge=1, strict=True, description='predictions per image (an integer: not true, not "3")'
    )
    candidate_labels: list[str] | None = Field(
        default=None, description="classify against these labels instead of a set"
    )
    hypothesis_template: str | None = Field(default=None, description="template with one {} for candidate_labels")
    unknown_threshold: float | None = Field(
        default=None, ge=-1.0, le=1.0, strict=True, description="top-1 cosine below this -> 'unknown'"
    )
    min_version: int | None = Field(
        default=None,
        ge=0,
        le=2**62,
        description="answer from the label set at least this new (the last version you saw); a lagging "
        "replica waits briefly, reads the database, else 503 + Retry-After",
    )
    unknown: Literal["calibrated"] | None = Field(
        default=None,
        description="'calibrated': answer 'unknown' below the threshold that accepts `acceptance` of the bundle's "
        "in-domain calibration images for this version of the set (422 if the bundle has no calibration sample)",
    )
    acceptance: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        strict=True,
        description="with unknown='calibrated': the share of in-domain images to accept (default 0.95)",
    )
    capture: bool = Field(
        default=True,
        strict=True,
        description="false: none of this request's images is kept for re-distillation (when the server captures)",
    )


class OperatingPoint(BaseModel):
    """The threshold a calibrated answer used (unknown='calibrated')."""

    policy: Literal["calibrated"] = "calibrated"
    score: Literal["cosine", "softmax"] = Field(description="the top-1 score compared with the threshold")
    threshold: float = Field(description="top-1 scores below this are answered 'unknown'")
    acceptance: float = Field(description="share of in-domain calibration images at or above the threshold")
    version: int | None = Field(description="the label-set version it was derived for (null: candidate_labels)")
    calibration_images: int = Field(description="calibration images of this set's classes it rests on")


class Prediction(BaseModel):
    class_id: int = Field(description="class id in the label set (position in candidate_labels for ad-hoc labels)")
    label: str
    score: float = Field(description="softmax over the whole set with the bundle's logit scale")
    cosine: float = Field(description="cosine similarity of image and class vector (independent of the set)")


class ImageResult(BaseModel):
    index: int
    label: str = Field(description="top-1 label, or 'unknown' when below unknown_threshold (or the calibrated one)")
    unknown: bool = False
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    label_set: str | None = Field(description="the set answered from; null for candidate_labels requests")
    version: int | None = Field(description="the set's version this answer was computed from")
    model: str = Field("", description="the bundle whose image tower answered (folder@digest; GET /v1/model)")
    results: list[ImageResult]
    operating_point: OperatingPoint | None = Field(
        default=None, description="with unknown='calibrated': the threshold used and how it was derived"
    )


class HFLabelScore(BaseModel):
    """One entry of a Hugging Face zero-shot-image-classification answer."""

    label: str
    score: float


# Requests in the Hugging Face shape (``inputs``) are answered in it: a list of {label, score} per
# image (best first), or one flat list when ``inputs`` is a single image.
HFAnswer = list[HFLabelScore] | list[list[HFLabelScore]]


class ClassesIn(_Body):
    """Add classes by name, by example images, or both (POST /v1/label-sets/{name}/classes)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"names": ["red panda", "okapi"]},
                {"names": ["axolotl"], "templates": ["a photo of a {}."]},
                {"names": ["okapi"], "examples": {"part 7-B": [_TINY_PNG], "okapi": [_TINY_PNG]}},
            ]
        },
    )

    names: list[str] = Field(
        default_factory=list, description="class names to add (all or none); may be empty when 'examples' are given"
    )
    templates: list[str] | None = Field(
        default=None, description="override the bundle's templates (prompt-free text sides only)"
    )
    if_exists: Literal["error", "skip"] = Field(
        default="error",
        description="a name the set already has: 'error' refuses the request (409); 'skip' leaves that name "
        "out and adds the rest, so a repeated request changes nothing (200 when nothing was added)",
    )
    if_similar: Literal["warn", "error"] = Field(
        default="warn",
        description="a new class flagged as a likely duplicate or confusion (see 'quality' in the answer): "
        "'warn' adds it and says so; 'error' refuses the request (409 with the pairs), nothing stored",
    )
    examples: dict[str, list[str]] | None = Field(
        default=None,
        description="class name -> example images (base64 or data: URIs). A name that is also in 'names' gets "
        "both (its text vector and the examples' prototype, combined); a name only here is an example-only "
        "class. Adding classes only (creating a set takes names)",
    )


class ExamplesIn(_Body):
    """More examples for an existing class (POST /v1/label-sets/{name}/classes/{id}/examples)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"examples": [_TINY_PNG]}]})

    examples: list[str] = Field(description="example images: base64 or data: URIs (URLs are refused)")


class LabelSetIn(ClassesIn):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "pets", "names": ["cat", "dog", "hamster"]}]}
    )

    name: str = Field(description="1-64 characters: letters, digits, '.', '_', '-'")
    index: Literal["flat", "ivf"] | None = Field(
        default=None,
        description="flat: exact search; ivf: approximate (FAISS IVF) for >= 100k classes, softmax denominator "
        "estimated outside the best candidates; stored with the set. Default: the service's index_kind setting",
    )
    if_exists: Literal["error", "skip"] = Field(
        default="error",
        description="the set already exists: 'error' refuses (409); 'skip' leaves it as it is and returns it (200)",
    )


class SimilarClass(BaseModel):
    """A class near a new one (service/quality.py says how ``flagged`` is decided)."""

    name: str
    class_id: int | None = Field(description="null: another class of the same request")
    cosine: float = Field(description="cosine of the two class vectors")
    tie_rate: float | None = Field(
        description="share of the in-domain calibration images either class wins on which the model prefers "
        "one by less than 2:1 (null: no calibration sample, or none of its images is theirs)"
    )
    support: int = Field(description="calibration images either class wins")
    flagged: bool = Field(description="likely duplicate or confusion")


class ClassQuality(BaseModel):
    name: str = Field(description="the new class")
    nearest: list[SimilarClass] = Field(description="its nearest classes, most similar first")
    flagged: bool = Field(description="one of them is flagged")


class ConfusablePair(BaseModel):
    a: str
    b: str
    a_id: int
    b_id: int
    cosine: float
    tie_rate: float | None
    support: int
    flagged: bool


class LabelSetReport(BaseModel):
    label_set: str
    version: int
    calibrated: bool = Field(description="tie rates come from the bundle's calibration sample")
    pairs: list[ConfusablePair] = Field(description="most confusable first")


class ClassOut(BaseModel):
    id: int
    name: str
    provenance: str = Field(
        description="how the class was made: bundle / zeroshot / promptkd:... (shipped), runtime (a name), "
        "examples (example images only), <origin>+examples (a name and example images)"
    )
    examples: int | None = Field(default=None, description="example images stored for the class (writes only)")
    replaces: int | None = Field(
        default=None,
        description="the id this class had before examples were added (a class's vector never changes under its id)",
    )


class LabelSetSummary(BaseModel):
    name: str
    version: int
    n_classes: int


class LabelSetList(BaseModel):
    label_sets: list[LabelSetSummary]


class ClassList(BaseModel):
    label_set: str
    version: int
    index_size: int = Field(description="vectors in the FAISS index serving this version")
    index: str = Field(default="flat", description="flat (exact) or ivf (approximate; exact below 10,000 classes)")
    classes: list[ClassOut] = Field(description="in ascending class id order")
    next_cursor: str | None = Field(
        default=None, description="pass as ?cursor= for the next page; null on the last page"
    )
    quality: list[ClassQuality] | None = Field(
        default=None, description="on creation: per class, its nearest classes, likely duplicates flagged"
    )


class ChangeOut(BaseModel):
    label_set: str
    version: int
    classes: list[ClassOut] = Field(description="the classes added or removed")
    skipped: list[str] = Field(default_factory=list, description="names already in the set (if_exists='skip')")
    gap: Literal["standardised", "centroid", "none"] | None = Field(
        default=None,
        description="classes from examples: how their prototype crossed the image-text modality gap; centroid: "
        "shifted by the bundle's text centroid minus its in-domain image centroid (Liang et al. 2022); standardised: "
        "that shift with the prototype's scores over the bundle's in-domain sample matched to its text vectors' "
        "(mean and spread, Z-norm); none: the bundle has no in-domain image sample, so the plain mean of the examples",
    )
    quality: list[ClassQuality] = Field(
        default_factory=list, description="per new class: its nearest classes, likely duplicates flagged"
    )


class DeletedSet(BaseModel):
    label_set: str
    deleted: bool = True
    version: int = Field(description="the store's clock after the deletion")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error response (``application/problem+json``)."""

    type: str = Field(
        description="URI naming the kind of problem", examples=["urn:promptdistill:problem:unknown_label_set"]
    )
    title: str = Field(description="short summary of the HTTP status", examples=["Not Found"])
    status: int = Field(description="the HTTP status code", examples=[404])
    detail: str = Field(description="what went wrong and what to do", examples=["unknown label set 'pets'"])
    code: str = Field(
        description="stable machine-readable code (the last part of type)", examples=["unknown_label_set"]
    )


class FieldError(BaseModel):
    """One invalid field of a request."""

    model_config = ConfigDict(populate_by_name=True)

    in_: str = Field(alias="in", description="body, query, path or header")
    pointer: str = Field(description="JSON Pointer (RFC 6901) to the field within that part", examples=["#/top_k"])
    field: str = Field(description="dotted field name", examples=["top_k"])
    detail: str = Field(examples=["Input should be greater than or equal to 1"])
    type: str = Field(description="pydantic's error type", examples=["greater_than_equal"])


class ValidationProblem(Problem):
    """A problem for a request that failed validation: one entry per invalid field."""

    errors: list[FieldError] = Field(
        default_factory=list, description="one entry per invalid field (absent when no single field is to blame)"
    )


class ImageURL(_Body):
    url: str = Field(description="a data: URI (data:image/png;base64,...); URLs are refused, never fetched")


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """vLLM's chat-style embedding input: each text or image_url part is one input."""

    role: str = Field(default="user", max_length=64, description="accepted for compatibility (user, system, ...)")
    content: str | list[ImagePart | TextPart] = Field(description="a text, or a list of text / image_url parts")


class EmbeddingsRequest(_Body):
    """OpenAI-style embeddings request in any of three conventions (one decoder: service/embedding_inputs.py):

    * NV-CLIP / NeMo Retriever: ``input`` holds texts and ``data:image/...`` URIs, the modality inferred per item;
    * Infinity: ``input`` plus ``modality`` ("image": every item is an image, base64 or a data: URI);
    * vLLM: ``messages`` with ``image_url`` / ``text`` content parts (one embedding per part, in order).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input": [_TINY_PNG], "model": "default", "modality": "image"},
                {"input": ["a photo of a cat", _TINY_PNG], "model": "default"},
                {
                    "model": "default",
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _TINY_PNG}}]}],
                },
                {"input": ["a photo of a cat"], "model": "default", "modality": "text", "encoding_format": "float"},
            ]
        },
    )

    input: str | list[str] | None = Field(
        default=None, description="texts and/or images (base64 / data: URIs); exactly one of input and messages"
    )
    messages: list[ChatMessage] | None = Field(
        default=None, description="vLLM chat style: text and image_url parts, one embedding each"
    )
    model: str = Field(default="default", max_length=256, description="accepted for compatibility; one model is served")
    modality: Literal["image", "text"] | None = Field(
        default=None,
        description="what every input is (Infinity's field); omitted: inferred per input, data:image/ URIs are "
        "images and everything else text (NV-CLIP's convention)",
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="float: a list of numbers; base64: little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(default=None, ge=1, description="must equal the model's dimension if given")
    user: str | None = Field(default=None, max_length=256, description="ignored (OpenAI field)")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="L2-normalised vector (a base64 string for base64 encoding)")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(description="encoder inputs: images, or text prompts (names x templates)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class ModelInfo(BaseModel):
    """``GET /v1/model``: the served bundle's card, what is loaded now, and the reload history."""

    card: dict[str, Any] = Field(description="the bundle's own record: method, training, evaluation, space")
    loaded: dict[str, str] = Field(description="since when, which version, backend and provider, served space")
    reloads: list[dict[str, str]] = Field(description="the last reloads: when, trigger, outcome, detail")


class ReloadOut(BaseModel):
    at: str
    trigger: str
    outcome: str
    detail: str
    bundle: str
    version: str = Field(description="the bundle now serving (folder@digest)")
