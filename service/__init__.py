"""The HTTP face of the distillation service: thin routes over distill/ and teachers/."""
