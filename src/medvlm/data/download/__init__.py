"""The PMC figure downloader: ``medvlm data download-images``.

- :mod:`.pmc` groups the URL rows by tarball, runs the workers and writes the resumable manifest;
- :mod:`.archive` streams one ``.tar.gz`` (bounded, gzip decoded here so truncation shows) and writes members;
- :mod:`.manifest` the per-pair tasks and the append-only, fsynced ``manifest.jsonl``;
- :mod:`.tar_guard` caps the tar headers :mod:`tarfile` would read whole.
"""

from medvlm.data.download.pmc import DownloadConfig, DownloadSummary, download_images, map_url, parse_url_map

__all__ = ["DownloadConfig", "DownloadSummary", "download_images", "map_url", "parse_url_map"]
