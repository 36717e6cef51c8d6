"""Every diagnostic code, with its title and explanation (`effc explain E0203`).

Codes are stable: a code is never reused for another meaning. E00xx: syntax and layout;
E01xx: names and references; E02xx: selectors; E03xx: calls, arguments and options;
E04xx: files and combinations; W01xx: warnings; E9xxx: internal errors.
"""

CODES: dict[str, tuple[str, str]] = {
    # syntax and layout
    "E0001": ("syntax error", "The text does not follow the grammar at this point. The message says what was expected."),
    "E0002": ("unexpected end of file", "The file ends in the middle of a statement, usually because a bracket is still open."),
    "E0003": ("tab in indentation", "Indentation must be spaces. Tabs are refused because their width is ambiguous."),
    "E0004": ("inconsistent dedent", "A line is indented less than its block but not as much as any enclosing block."),
    "E0005": ("unexpected indentation", "Only the statements of a stage are indented. A top-level line, or a statement that is indented more than its neighbours, is an error."),
    "E0006": ("nesting too deep", "Expressions and lists may nest at most 100 levels. Split deep expressions using params."),
    "E0007": ("unterminated string", "A string must close on the line it opens; strings cannot span lines."),
    "E0008": ("unclosed bracket", "A '(', '[' or '{' is never closed. Lines continue inside open brackets, so the error is noticed where the next statement starts."),
    "E0009": ("statement outside a stage", "train, eval, adapt, share, tie, prune and quantize run inside a 'stage NAME:' block. Only export may also appear at top level."),
    "E0010": ("unreadable file", "The file could not be read, or is not UTF-8 text."),
    "E0012": ("number too large", "A number literal has more than 30 digits, or a float or size that is not finite."),
    "E0011": ("empty block", "A 'stage NAME:' header must be followed by at least one indented statement."),
    # names and references
    "E0101": ("undefined name", "A name is used that no param, model or data declaration defines (before this point)."),
    "E0102": ("duplicate declaration", "Two declarations use the same name. Params, models and data share one namespace; stages have their own."),
    "E0103": ("name shadows a choice", "A param's name is also an enum choice of the language (such as 'average' or 'cosine'). A bare name there would be ambiguous, so this is refused."),
    "E0104": ("duplicate pipeline or budget", "A file has at most one 'pipeline' and one 'budget' declaration."),
    "E0105": ("unknown stage", "A snapshot 'model@stage' names a stage that does not exist."),
    "E0106": ("stage not finished", "A snapshot 'model@stage' refers to a stage that comes later in the file, or to the stage being declared. Snapshots name the model as it was at the end of an earlier stage."),
    "E0107": ("wrong kind of name", "A name refers to a declaration of the wrong kind, such as data where a model is expected."),
    "E0108": ("unknown data split", "A data declaration provides the splits 'train' and 'validation'."),
    "E0109": ("model not in snapshot", "The model was declared after the stage named in the snapshot ended, so the snapshot does not hold it."),
    "E0110": ("snapshot where a live model is needed", "A statement that changes or trains a model acts on the live model, never on a snapshot."),
    "E0111": ("unknown param override", "A '--set name=value' names no param of the file, or its value does not parse."),
    "E0112": ("bad plan override", "A '--plan key=value' names no field of the execution plan (micro_batch, accumulate, checkpoint, precision, kernels, compile), or its value is not one the field takes (for example a checkpoint list whose length is not the model's layer count)."),
    "E0113": ("bad --memory value", "'--memory' takes a size as the language writes one (8GiB, 512MiB, 1.5GB); it replaces the file's budget(memory=...) for this command."),
    # selectors
    "E0201": ("selector root is not a model", "A selector starts with the name of a declared model."),
    "E0202": ("index out of range", "A list index or slice in a selector lies outside the list (for example layers[6] of a 6-layer model)."),
    "E0203": ("selector matches nothing", "A path in a selector, or a member of a {...} set, names no module. The hint lists the real names at that point."),
    "E0204": ("unknown kind filter", "A ':kind' filter names no module kind. The kinds are: model, embedding, block, attention, mlp, linear, norm, list."),
    "E0205": ("index on a non-list", "Only list modules (such as layers) can be indexed, and a list must be indexed before its elements' members are named."),
    "E0206": ("technique does not apply", "The technique applies to modules of certain kinds (lora: linear layers), and the selection holds none."),
    "E0207": ("duplicate adapter", "Two adapters of the same kind and scope on one weight would be ambiguous. Adapters of different kinds or scopes compose additively."),
    "E0208": ("kind filter matches nothing", "The ':kind' filter removed every selected module."),
    "E0209": ("adapter must be alone on its weight", "DoRA and IA3 rescale the weight they adapt, and PaCA trains some of its columns in place, so they do not compose with other adapters on the same weight: a weight with a dora, ia3 or paca adapter has no other adapter."),
    # calls, arguments and options
    "E0210": ("compression out of order", "A model changes in declaration order. Sharing replaces whole layers, so it comes before adapting, pruning or quantizing them; pruning comes before quantization, which freezes a weight's values and stores it packed; a weight is quantized once; DoRA, PaCA and SVFit read or rewrite the dense weight, so they cannot sit on a quantized one (PaCA and SVFit not on a pruned one either); per_loop adapters need layers that share a block; a tied head is neither pruned nor quantized."),
    "E0301": ("unknown name in registry", "No model family, data source, technique, optimizer, schedule or merge of that name exists. The hint lists the available ones."),
    "E0302": ("not available in this version", "The name or option is part of the settled language but its implementation has not landed in this version of effc. It is refused rather than ignored."),
    "E0303": ("unknown argument", "The call has no parameter of that name. The hint lists its parameters."),
    "E0304": ("missing argument", "A required parameter is not given."),
    "E0305": ("wrong type", "A value has the wrong type for its parameter (for example a string where an integer is expected)."),
    "E0306": ("value out of range", "A value lies outside the parameter's range (for example rank <= 0, or a rate outside [0, 1))."),
    "E0307": ("invalid choice", "A bare name is not one of the parameter's declared choices."),
    "E0308": ("bad argument order", "Positional arguments come before keyword arguments, each parameter is given once, and a call takes at most as many positional arguments as it has parameters."),
    "E0309": ("incompatible arguments", "Arguments that are each valid do not fit together (for example heads must divide dim)."),
    "E0310": ("unknown option", "The statement has no option of that name. The hint lists its options."),
    "E0311": ("missing option", "A required option of the statement is not given (for example train needs steps)."),
    "E0312": ("bad arithmetic", "Arithmetic on values that do not support it, or division by zero."),
    "E0313": ("expected a call", "A model or data declaration is a call: 'model m = decoder(...)', 'data d = text(...)'."),
    "E0314": ("wrong list length", "A list parameter needs a fixed number of items (for example betas=[0.9, 0.999])."),
    # files and combinations
    "E0401": ("file not found", "A path in the file (relative to the .eff file's folder) does not exist."),
    "E0402": ("sequence too long for the model", "The data's seq is longer than the model's maximum sequence length."),
    "E0404": ("over the memory budget", "The cost estimate predicts a peak memory for a train step above the file's budget(memory=...). The hint names the largest contributor."),
    "E0403": ("option needs another option", "An option only makes sense with another (for example metrics=[similarity] needs against=)."),
    "E0405": ("data and model disagree", "The data produces token ids the model's vocabulary cannot hold (byte-level text needs vocab >= 256), or sequences longer than the model's seq; or it is not what the model learns from: a sentence encoder trains and is evaluated on (anchor, positive) pairs, jsonl(..., prompt=, response=) records tokenized by its checkpoint's tokenizer."),
    "E0410": ("metric does not apply to the model", "A metric or comparison needs a kind of model the statement does not have: perplexity needs a language model (a sentence encoder predicts no tokens), against= compares two models of one kind (two sentence encoders, or two language models), and similarity compares encoders' embeddings of one width."),
    "E0409": ("adapter cannot be merged", "merge_adapters=true (and format=hf, which always merges) folds every adapter into the weights it adapts. Bottleneck adapters (a small nonlinear network) and soft prompts (extra input positions) have no such fold: export the model with format=effc and merge_adapters=false, which keeps them, or (soft prompts) format=peft."),
    "E0407": ("format=peft cannot hold the adapters", "PEFT's adapter folder holds one kind of adapter (lora, dora, ia3 or prompt), one per module, on a Hugging Face model's modules, apart from the base weights. The message says which of these the model breaks: another family, merge_adapters=true, no adapters, a kind PEFT does not have, mixed kinds, two adapters on one weight, differing dropouts or initialisations, or GPT-2's fused q, k, v."),
    "E0408": ("PEFT adapter cannot be imported", "peft(\"dir\") reads the folder's adapter_config.json at check time: it must exist, be a LoRA (optionally use_dora, use_rslora), IA3 or prompt-tuning adapter without options effc would compute differently (a bias, modules_to_save, an unconverted PiSSA initialisation), and target linear layers of a Hugging Face (or decoder) model."),
    "E0501": ("data cannot be read", "At run time a data file was missing, empty or malformed, or holds too few tokens for one sequence. The message names the file and line."),
    "E0502": ("export would overwrite", "An export folder already exists. effc never overwrites an export silently: pass --force, or choose another path."),
    "E0503": ("files cannot be read or written", "The run folder, a checkpoint in it, or an export folder cannot be read or written (a permission problem, a full disk, or a corrupt checkpoint)."),
    "E0504": ("checkpoint or export unusable", "At run time a Hugging Face checkpoint's weights were missing, damaged, stored as pickle, or disagreed with its config.json; or a model could not be written in the export format asked for."),
    "E0406": ("export format cannot hold the model", "The export format has no place for something the model has: format=hf holds a plain transformers model, so adapters must be merged (merge_adapters=true) or exported on their own."),
    # warnings
    "W0101": ("unused declaration", "A param, model or data declaration is never used."),
    "W0103": ("export undoes compression", "format=hf holds a plain transformers model: quantized weights are written dequantized to fp32 and the loops of shared blocks as separate layers, so the folder is as large as the uncompressed model. format=effc keeps the compressed storage."),
    "W0102": ("merge changes the model's storage", "Folding adapters into the base weights changes more than their values: an adapter on a tied head gives the head its own matrix, so the export stores it separately from the embedding."),
    # internal
    "E9001": ("internal error", "effc itself failed. Please report it with the file that caused it."),
}
