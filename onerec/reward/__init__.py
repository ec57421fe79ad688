"""Preference alignment's reward model: logged-session labels, the model, its training and session scoring."""
