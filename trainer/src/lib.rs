//! Stage 2 of dmsae: SAE training from a store. Nothing here yet (see the trainer issue).
