"""The loop on top of the pipelines and the services: `dolly up` (data to a served model in one
command), `dolly retrain` (a candidate on more data, promoted only past the gate) and the deploys
they share with `dolly serve`."""
