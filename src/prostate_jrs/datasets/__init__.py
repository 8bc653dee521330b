"""From a hospital's DICOM archive to the project's dataset format (docs/ARCHITECTURE.md, "Dataset on disk").

* :mod:`~prostate_jrs.datasets.archive`: which patients, planning scans and daily scans an archive export holds;
* :mod:`~prostate_jrs.datasets.importer`: ``prostate-jrs import``: pseudonymised NIfTI + ``datalist.json``, per
  patient complete or not at all, resumable, in parallel;
* :mod:`~prostate_jrs.datasets.pseudonyms`: the pseudonym key the site keeps;
* :mod:`~prostate_jrs.datasets.report`: what was imported and skipped, and why;
* :mod:`~prostate_jrs.datasets.splits`: training / validation / test by patient.

Nothing is imported here, so that ``prostate_jrs.datasets.splits`` stays light for the phantom writer.
"""
