"""Engines: where the stages run (in-process threads, Ray, Spark). They wire stages; they hold no logic of their own."""
