"""Patient-specific adaptation: fine-tune the network on the fractions a clinician approved, for that patient only.

In adaptive radiotherapy a patient returns 20-40 times; after the first fractions the clinic holds approved contours
on the patient's own daily scans. Fine-tuning the network on the planning scan and the first approved fraction(s)
reduces contour errors on the later fractions (Elmahdy et al., ISBI 2020). Modules, in the order of the data flow:

* :mod:`~prostate_jrs.adaptation.sessions`: approved fractions of one patient from DICOM folders;
* :mod:`~prostate_jrs.adaptation.pairs`: their pairs on the bundle's model grid, and the synthetic deformation of
  the planning scan that augments them;
* :mod:`~prostate_jrs.adaptation.finetune`: fine-tuning through the bundle's own ``train.json`` trainer;
* :mod:`~prostate_jrs.adaptation.patient_bundle`: the patient bundle (weights, pseudonym, record) and the rule that
  it runs for no other patient (:func:`~prostate_jrs.adaptation.patient_bundle.check_bundle_patient`);
* :mod:`~prostate_jrs.adaptation.runner`: all of it in one call, :func:`~prostate_jrs.adaptation.runner.adapt_patient`
  (``prostate-jrs adapt``).

Nothing is imported here: :mod:`prostate_jrs.dicom_session` imports the patient-bundle check, and the other modules
import :mod:`prostate_jrs.dicom_session`.
"""
