"""Loss functions as plain tensor math (no model, no ranks): cross-entropy, preference, distillation."""
