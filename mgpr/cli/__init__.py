"""Entry points: mgpr, mgpr-test-image, mgpr-fetch-weights, mgpr-doctor, mgpr-slurm-job."""
