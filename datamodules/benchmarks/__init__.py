"""The field's benchmarks as distributed (BP4D, DISFA, Aff-Wild2) imported into manifests."""
