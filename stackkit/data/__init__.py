"""Step 1, data: DICOM headers and pixels (`dicom`), the RSNA folders -> contract files (`prepare`),
and the synthetic RSNA-layout generator (`synth`). pydicom is imported by the functions that need it."""
