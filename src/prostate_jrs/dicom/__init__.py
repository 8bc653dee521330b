"""DICOM input and output: series discovery and selection, CT series, RTSTRUCT, SEG and deformable registration.

Import the submodules directly (``from prostate_jrs.dicom.rtstruct_reader import read_rtstruct``); this package
imports nothing at load time so that the library stays light.
"""
