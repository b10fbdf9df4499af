"""persona: event-driven continual personalization with one LoRA adapter per user over one frozen base model."""

__version__ = "0.1.0"
