/* Prints the effective uid it runs with: a planted setuid binary's owner. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("%u\n", (unsigned)geteuid());
    return 0;
}
