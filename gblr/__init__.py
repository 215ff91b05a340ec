"""gblr: learned structured weight matrices (Gaudi-GBLR, ICLR 2024) under a FLOP budget."""
