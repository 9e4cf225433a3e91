"""Images: references, the registry client, the content store, unpacking and snapshots."""
