"""Fixtures of the DICOM node tests: tiny synthetic sessions, a tiny bundle, started nodes and storage SCPs (helpers in
``node_testing.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from node_testing import (
    RESULT_CLASSES,
    LogRecorder,
    Processed,
    StorageReceiver,
    c_store,
    free_port,
    jobs_of,
    node_config,
    session_files,
    start_receiver,
)

from prostate_jrs.node import DicomNode
from prostate_jrs.phantom import PhantomConfig, write_dataset
from prostate_jrs.phantom.dicom_export import export_dicom_sessions
from prostate_jrs.tiny_bundle import write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def node_sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny synthetic patients (JRS001, JRS002), one fraction each: the NIfTI dataset and ``dicom/<session>/``."""
    root = tmp_path_factory.mktemp("node_synth") / "data"
    write_dataset(root, n_patients=2, n_fractions=1, seed=5, config=PhantomConfig.tiny())
    export_dicom_sessions(root)
    return root


@pytest.fixture(scope="session")
def node_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repo's bundle configs with tiny settings and randomly initialised weights."""
    return write_tiny_bundle(REPO / "bundle", tmp_path_factory.mktemp("node_bundle") / "tiny_bundle")


@pytest.fixture
def receiver() -> Iterator[Callable[..., StorageReceiver]]:
    """``receiver(sop_classes=RESULT_CLASSES)``: a started storage SCP that accepts those classes only."""
    started: list[StorageReceiver] = []

    def start(sop_classes: Sequence[str] = RESULT_CLASSES) -> StorageReceiver:
        started.append(start_receiver(sop_classes))
        return started[-1]

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture
def start_node(tmp_path: Path, node_bundle: Path) -> Iterator[Callable[..., DicomNode]]:
    """``start_node(destination_port, **overrides)``: a started node with :func:`node_testing.node_config` settings."""
    nodes: list[DicomNode] = []

    def start(destination_port: int, **overrides: object) -> DicomNode:
        node = DicomNode(node_config(tmp_path / f"work{len(nodes)}", node_bundle, destination_port, **overrides))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def processed(node_sessions: Path, node_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processed]:
    """JRS001's session sent to a node by C-STORE and processed (library pipeline, tiny bundle); the destination is
    down for good, so the job fails after its send attempts with its results kept."""
    node = DicomNode(node_config(tmp_path_factory.mktemp("processed"), node_bundle, free_port(), send_attempts=3))
    files = session_files(node_sessions / "dicom" / "JRS001_f01")
    with LogRecorder() as recorder:
        node.start()
        try:
            assert set(c_store(files, node.port)) == {0x0000}
            assert node.wait_idle(300)
        finally:
            node.stop()
    (job,) = jobs_of(node)
    yield Processed(job, recorder.lines, files)
