"""What a dataset must pass before the catalog registers it, whoever publishes it.

``POST /v1/datasets/{team}/{name}/versions`` (a user's ``labelgen publish``) and the job
tracker (a job's output, published for its submitter) check the same things: the URL
is storage the service may publish from (:func:`labelgen.service.locations.check_storage_url`),
every file matches its record (:func:`labelgen.service.verify.verify_dataset`), and on a
filesystem no file is a link out of the dataset's directory.
"""

from __future__ import annotations

import os

from labelgen.contract.storage import is_local
from labelgen.service import locations
from labelgen.service.settings import ServiceSettings
from labelgen.service.verify import VerifiedDataset, verify_dataset

__all__ = ["verify_for_publish"]


def verify_for_publish(url: str, settings: ServiceSettings) -> VerifiedDataset:
    """The dataset at ``url``, verified for publishing under ``settings``' storage rules.

    Raises:
        ServiceError: the URL is not storage the service publishes from (400), or a file
            links out of the dataset (403).
        PublishRefused: the dataset is incomplete, or a file does not match its record.
        OSError: the service cannot read the storage.
    """
    storage = locations.check_storage_url(url, settings.fs_roots, settings.local_paths)
    verified = verify_dataset(storage)
    fs, root = locations.storage_fs(verified.url)
    if is_local(fs):
        for f in verified.files:
            locations.check_local_file(root, os.path.join(root, f.path))
    return verified
