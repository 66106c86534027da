"""alsace_ds: ALSACE teacher-language selection and cross-lingual self-distillation on DeepSpeed."""
