"""The show layer: heatmaps, the neuron inspector, the neuron browser and the HTML report.

Each reads what the method computed; none changes a model.
"""
