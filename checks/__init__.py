"""peftnode's verification side: checks that prove a node is ready for PEFT fine-tuning."""

__version__ = "0.1.0"
