"""Preference alignment: DPO-family losses over session log-probabilities and chosen/rejected pair selection."""
