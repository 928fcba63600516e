"""Side-by-side benchmarks: the data pipeline against a DataLoader (data.py), the engine against the bare loop
(train.py). Their figures are ratios measured in one run, never asserted by tests."""
