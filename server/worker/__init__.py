"""The worker side of easel: for every model loaded in this process, a loop that
claims its jobs, runs them and decides their outcome (``loop.Worker``); the model
host, the one writer of a model's state (``host.ModelHost``); the model's own
process (``process.ModelProcess``); presence (``presence``); a running job's context
(``context``); its pipeline calls (``execute``); encoding (``encode``); and how a job
ends (``outcome``)."""
