"""GLUE multi-task harness: data, models, training methods (incl. MTL-LoRA and LoRI), CLI."""
