"""One module per distributed kind; each defines DRIVERS = (SomeDriver(), ...) (see base.Driver)."""
