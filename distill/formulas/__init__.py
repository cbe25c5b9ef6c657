"""Pure tensor math (torch only, float64-tested): mixtures, fits, divergences, the chunked token loss, layer terms, schedules."""
