"""Images as crishim keeps them: identity, names, layers and their snapshots."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from crishim.model.record import Record


class ImageLayer(BaseModel):
    """One layer: the blob as stored and the snapshot it was unpacked into."""

    model_config = ConfigDict(frozen=True)

    digest: str
    size: int
    media_type: str
    diff_id: str
    chain_id: str


class Image(Record):
    """An image; ``id`` is its config digest, as the CRI defines image IDs."""

    repo_tags: list[str] = Field(default_factory=list)
    repo_digests: list[str] = Field(default_factory=list)
    size: int = Field(description="bytes of config and compressed layers")
    manifest_digest: str
    metadata_blobs: list[str] = Field(
        default_factory=list, description="indexes, manifest and config this image needs"
    )
    layers: list[ImageLayer] = Field(default_factory=list)
    user: str = Field(default="", description="the config's User, verbatim")
    pinned: bool = False
    pulled_at: int = 0

    @property
    def top_chain_id(self) -> str:
        """The snapshot holding the whole image ("" for an image without layers)."""
        return self.layers[-1].chain_id if self.layers else ""

    def blobs(self) -> set[str]:
        """Every blob the image needs kept."""
        return set(self.metadata_blobs) | {layer.digest for layer in self.layers}

    def chain(self) -> list[str]:
        """The chain IDs of its snapshots, bottom first."""
        return [layer.chain_id for layer in self.layers]

    def uid_and_username(self) -> tuple[int | None, str]:
        """The config's User as the CRI reports it: a numeric uid, or a user name."""
        user = self.user.split(":", 1)[0]
        if user.isdigit():
            return int(user), ""
        return None, user
