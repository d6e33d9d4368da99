/* Table-driven option parsing: one table per command gives getopt_long its
 * options and the usage text its lines, so help and parser cannot drift. */
#ifndef TS_CLI_H
#define TS_CLI_H

#include <stdio.h>

typedef enum cli_kind {
    CLI_FLAG,   /* int*: set to 1 when present */
    CLI_INT,    /* int* */
    CLI_DOUBLE, /* double* */
    CLI_STRING, /* const char** (points into argv) */
    CLI_STRING_LIST, /* cli_strings*: every occurrence appended (repeatable option); free(v) after use */
} cli_kind;

/* The destination of a CLI_STRING_LIST option: the values in order (they point into argv). */
typedef struct cli_strings {
    const char **v;
    int n;
} cli_strings;

typedef struct cli_option {
    const char *name; /* long name, used as --name */
    char short_name;  /* 0 for none */
    cli_kind kind;
    void *dest;
    const char *metavar; /* shown in usage, e.g. "N" */
    const char *help;
    double min, max; /* CLI_INT/CLI_DOUBLE: accepted range, inclusive */
} cli_option;

typedef struct cli_command {
    const char *name;
    const char *args;    /* positional arguments in usage, e.g. "[conv]" */
    const char *summary; /* one line for the command list */
    cli_option *options; /* terminated by an entry with name == NULL */
    int (*run)(int argc, char **argv); /* argv = positional arguments after options */
} cli_command;

/* Parses argv (argv[0] is the command name) against cmd->options, writing
 * into their destinations. Unknown options, missing or malformed values and
 * out-of-range numbers print a message naming the option to stderr and
 * return 2. "--help" prints the command's usage and returns 1. On success
 * returns 0 and sets *first_positional to the index of the first
 * positional argument. */
int cli_parse(const char *prog, const cli_command *cmd, int argc, char **argv, int *first_positional);
/* The usage text of one command, generated from its option table (defaults
 * are the destinations' current values). */
void cli_print_usage(FILE *f, const char *prog, const cli_command *cmd);
/* The same reference as Markdown (docs/commands.md, `terraseg help
 * --markdown`): a "## PROG NAME" heading, the synopsis, the summary and a
 * table of the options with their defaults and ranges. Defaults are the
 * destinations' current values, so a table must hold only values that are
 * the same on every machine (0 for "every core", never a count found at run
 * time); an option named "threads" shows its 0 as "all cores". */
void cli_print_markdown(FILE *f, const char *prog, const cli_command *cmd);

#endif
